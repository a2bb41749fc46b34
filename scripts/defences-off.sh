#!/usr/bin/env bash
# Shows that each security test can fail: builds the workspace once with every defence of
# scripts/defences.txt switched off (test-only cargo features `without-aNN`, which refuse to
# compile in a release build) into target/defences-off, then runs each listed test against that
# build and expects it to FAIL. A test that still passes there asserts nothing about its defence.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d "$HOME/.cargo/bin" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
list=scripts/defences.txt
target=target/defences-off
mapfile -t rows < <(grep -v '^\s*#' "$list" | grep -v '^\s*$')
[ "${#rows[@]}" -gt 0 ] || { echo "no defences listed in $list"; exit 0; }
features=$(printf '%s\n' "${rows[@]}" | awk '{print $1}' | tr , '\n' | sort -u | paste -sd, -)
echo "==> building with the defences off: $features"
cargo build --quiet --workspace --bins --target-dir "$target" --features "$features"
export STOCKADE_BIN="$PWD/$target/debug/stockade"
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
for row in "${rows[@]}"; do
  read -r feature package testfile name <<<"$row"
  log=$(mktemp)
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
  rm -f "$log"
done
exit "$status"
