#!/usr/bin/env bash
# The project's test command: formatting, lints, every test, a short fuzz run of every target,
# and a check that nothing touched the host's real /nix. Runs as root on Debian 12; first
# installs whatever is missing (scripts/deps.sh: nix-bin, busybox-static, cargo-fuzz, Nix 2.26
# under /opt/stockade-newer-nix, ...).
# Environment: SKIP_FUZZ=1 skips the fuzz run (local use; CI never sets it),
#              FUZZ_SECS=N seconds per fuzz target (default 20),
#              STOCKADE_NEWER_NIX=DIR where Nix 2.26 is (installed if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d "$HOME/.cargo/bin" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
start=${STOCKADE_CI_START:-$(date +%s)}

step() { printf '\n==> [%ss] %s\n' "$(($(date +%s) - start))" "$*"; }

# Before the listing of /nix below: installing nix-bin may create it.
step "scripts/deps.sh (install what is missing)"
scripts/deps.sh

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A listing of the host's /nix with modes, sizes, owners, mtimes and link targets.
nix_listing() {
  if [ -e /nix ]; then
    find /nix -printf '%p %m %s %U:%G %T@ %l\n' | LC_ALL=C sort
  else
    echo "/nix absent"
  fi
}
nix_listing >"$work/nix-before"

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
step "cargo clippy --workspace --all-targets --features stockade-broker/evil -- -D warnings"
cargo clippy --workspace --all-targets --features stockade-broker/evil -- -D warnings

# The integration tests start target/debug/stockade; `cargo test` alone does not build it.
step "cargo build --workspace --bins"
cargo build --workspace --bins

# The compromised broker of tests/tests/compromised_broker.rs (test-only feature `evil`: a
# second binary of the broker crate; stockade-broker itself is the same with or without it).
# `--workspace` keeps the dependencies' features those of the build above, so only the broker
# crate compiles.
step "cargo build --bin stockade-evil-broker (feature stockade-broker/evil)"
cargo build --workspace --features stockade-broker/evil --bin stockade-evil-broker
export STOCKADE_EVIL_BROKER="${CARGO_TARGET_DIR:-$PWD/target}/debug/stockade-evil-broker"

# The A28 race tests (tests/tests/gc_pause.rs) run a store-writer whose collections stop
# where a test arms them (test-only feature test-gc-pause), built apart so that the binaries
# above stay as they are.
step "cargo build --bin stockade-store-writer (feature test-gc-pause, target/gc-pause)"
cargo build -p stockade-store-writer --bin stockade-store-writer --features test-gc-pause \
  --target-dir "${CARGO_TARGET_DIR:-$PWD/target}/gc-pause"
export STOCKADE_GC_PAUSE_WRITER="${CARGO_TARGET_DIR:-$PWD/target}/gc-pause/debug/stockade-store-writer"

step "cargo test --workspace"
set +e
cargo test --workspace 2>&1 | tee "$work/test.log"
test_status=${PIPESTATUS[0]}
set -e
# Sum the per-binary "test result:" lines into one closing line.
read -r passed failed ignored < <(awk '
  /^test result:/ { for (i = 1; i <= NF; i++) {
      if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } }
  END { print p + 0, f + 0, g + 0 }' "$work/test.log")
summary="tests: $passed passed, $failed failed, $ignored skipped"
if [ "$test_status" -ne 0 ]; then
  echo "cargo test failed (status $test_status)"
  echo "$summary"
  exit "$test_status"
fi
if [ "$passed" -eq 0 ]; then
  echo "cargo test ran no test"
  exit 1
fi

step "scripts/defences-off.sh (each security test fails with its defence off)"
scripts/defences-off.sh

if [ "${SKIP_FUZZ:-0}" = 1 ] && [ -z "${CI:-}" ]; then
  step "fuzz smoke run skipped (SKIP_FUZZ=1)"
else
  step "fuzz/smoke.sh ${FUZZ_SECS:-20}"
  fuzz/smoke.sh "${FUZZ_SECS:-20}"
fi

step "host /nix untouched"
nix_listing >"$work/nix-after"
if ! cmp -s "$work/nix-before" "$work/nix-after"; then
  echo "FAIL: the host's /nix changed during the run:"
  diff "$work/nix-before" "$work/nix-after" | head -n 50 || true
  echo "$summary"
  exit 1
fi
echo "host /nix unchanged ($(wc -l <"$work/nix-after") entries, sha256 $(sha256sum <"$work/nix-after" | cut -c1-16))"

echo
echo "total time: $(($(date +%s) - start)) s"
echo "$summary"
