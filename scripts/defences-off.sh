#!/usr/bin/env bash
# Shows that each security test can fail: builds the workspace once with the defences of
# scripts/defences.txt switched off (test-only cargo features `without-…`, which refuse to
# compile in a release build) into target/defences-off, then runs each listed test against that
# build and expects it to FAIL. A test that still passes there asserts nothing about its defence.
#
# A control test (tests/tests/defences_control.rs: an untrusted add and build) must PASS
# against that shared build: a switch that breaks every build would make each build test fail
# for that reason alone. Such a switch is marked `#! alone <feature>` in defences.txt: it is
# left out of the shared build, and each row naming it runs against a build of its own row's
# features only (target/defences-off-alone).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d "$HOME/.cargo/bin" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
list=scripts/defences.txt
target=target/defences-off
mapfile -t rows < <(grep -v '^\s*#' "$list" | grep -v '^\s*$')
[ "${#rows[@]}" -gt 0 ] || { echo "no defences listed in $list"; exit 0; }
mapfile -t alone < <(awk '$1 == "#!" && $2 == "alone" {print $3}' "$list")

# Whether a row's feature list names a feature marked alone.
is_alone() {
  local f
  for f in $(tr , ' ' <<<"$1"); do
    for a in "${alone[@]}"; do [ "$f" = "$a" ] && return 0; done
  done
  return 1
}

shared=$(for row in "${rows[@]}"; do
  read -r feature _ <<<"$row"
  is_alone "$feature" || tr , '\n' <<<"$feature"
done | sort -u | paste -sd, -)
echo "==> building with the defences off: $shared"
cargo build --quiet --workspace --bins --target-dir "$target" --features "$shared"
shared_bin="$PWD/$target/debug/stockade"
# The A28 tests (tests/src/gcpause.rs) then run this build's store-writer, which has
# test-gc-pause (listed with their switches), not the pausing one of the normal build.
unset STOCKADE_GC_PAUSE_WRITER
# compromised_broker.rs runs the evil broker of the normal build (its own lockdown intact)
# against the defences-off store-writer; scripts/test.sh has built it already.
if [ -z "${STOCKADE_EVIL_BROKER:-}" ]; then
  cargo build --quiet --workspace --features stockade-broker/evil --bin stockade-evil-broker
  export STOCKADE_EVIL_BROKER="${CARGO_TARGET_DIR:-$PWD/target}/debug/stockade-evil-broker"
fi
status=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "==> control: an untrusted add and build must work with those defences off"
if STOCKADE_BIN="$shared_bin" cargo test --quiet -p stockade-tests --test defences_control \
    >"$log" 2>&1; then
  echo "ok: the control passes"
else
  echo "FAIL: the control fails in the shared build; a switch breaks builds (mark it alone)"
  tail -n 30 "$log"
  status=1
fi

for row in "${rows[@]}"; do
  read -r feature package testfile name <<<"$row"
  export STOCKADE_BIN="$shared_bin"
  if is_alone "$feature"; then
    cargo build --quiet --workspace --bins --target-dir "$target-alone" --features "$feature"
    export STOCKADE_BIN="$PWD/$target-alone/debug/stockade"
  fi
  # A test in the defence's own package links it: build that package's tests with the
  # feature (in a target dir of their own, so the binaries above stay as they are).
  extra=()
  if [ "${feature%%/*}" = "$package" ]; then
    extra=(--target-dir "$target-tests" --features "$feature")
  fi
  if cargo test --quiet "${extra[@]}" -p "$package" --test "$testfile" -- --exact "$name" \
      >"$log" 2>&1; then
    echo "FAIL: $package --test $testfile $name passed with $feature (its defence) off"
    tail -n 20 "$log"
    status=1
  elif grep -q "test result: FAILED" "$log"; then
    echo "ok: $name fails with $feature off"
  else
    echo "FAIL: $package --test $testfile $name did not run as a failing test with $feature off"
    tail -n 20 "$log"
    status=1
  fi
done
exit "$status"
