#!/usr/bin/env bash
# Installs what scripts/test.sh needs, and only what is missing (a second run changes nothing):
#   apt packages  nix-bin (Nix 2.8: the reference nix-daemon and clients), busybox-static
#                 (builders of test derivations), util-linux (unshare, setpriv), passwd
#                 (useradd), python3, libc6-dev (static libc for the sandbox probe, built with cc -static);
#   cargo-fuzz    (cargo install cargo-fuzz --locked) for fuzz/smoke.sh, which runs on the
#                 stable toolchain (RUSTC_BOOTSTRAP=1), so no other toolchain is needed;
#   Nix 2.26      under $STOCKADE_NEWER_NIX (default /opt/stockade-newer-nix) by
#                 scripts/newer-nix.sh: never system-wide, never in /nix.
# Needs root only when something must be installed with apt or in a prefix it cannot write;
# then it stops with a list of what is missing.
# Environment: SKIP_FUZZ=1 (outside CI) also skips cargo-fuzz.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d "$HOME/.cargo/bin" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
export DEBIAN_FRONTEND=noninteractive
root=false
[ "$(id -u)" = 0 ] && root=true

missing_apt=()
for p in nix-bin busybox-static util-linux passwd python3 libc6-dev; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed'; then
    missing_apt+=("$p")
  fi
done

prefix=${STOCKADE_NEWER_NIX:-/opt/stockade-newer-nix}
newer=true
{ [ -e "$prefix/.complete" ] && [ -x "$prefix/bin/nix-daemon" ]; } && newer=false

fuzz=false
if ! { [ "${SKIP_FUZZ:-0}" = 1 ] && [ -z "${CI:-}" ]; }; then
  command -v cargo-fuzz >/dev/null || fuzz=true
fi

if ! command -v cargo >/dev/null; then
  echo "deps: cargo is missing: install a Rust toolchain (1.80 or newer, e.g. from rustup)" >&2
  exit 1
fi

if ! $root; then
  problems=()
  [ ${#missing_apt[@]} -gt 0 ] && problems+=("apt packages: ${missing_apt[*]}")
  if $newer; then
    parent=$(dirname "$prefix")
    if ! { [ -w "$parent" ] || [ -w "$prefix" ]; }; then
      problems+=("Nix 2.26 in $prefix (scripts/newer-nix.sh, or set STOCKADE_NEWER_NIX to a writable directory)")
    fi
  fi
  if [ ${#problems[@]} -gt 0 ]; then
    echo "deps: missing, and installing needs root:" >&2
    printf '  - %s\n' "${problems[@]}" >&2
    echo "deps: run scripts/deps.sh (or scripts/test.sh) as root once" >&2
    exit 1
  fi
fi

if [ ${#missing_apt[@]} -gt 0 ]; then
  echo "deps: apt-get install ${missing_apt[*]}"
  apt-get update
  apt-get install -y "${missing_apt[@]}"
fi
if $fuzz; then
  echo "deps: cargo install cargo-fuzz --locked"
  cargo install cargo-fuzz --locked
fi
if $newer; then
  echo "deps: Nix 2.26 into $prefix"
  STOCKADE_NEWER_NIX=$prefix scripts/newer-nix.sh
fi
echo "deps: all present (Nix $(nix-store --version | awk '{print $NF}'), newer Nix $(cat "$prefix/.complete"))"
