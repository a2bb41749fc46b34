#!/usr/bin/env bash
# NAR hashing speed: Stockade's dump+hash vs `nix-hash --type sha256` vs raw `openssl dgst -sha256`
# over the same bytes, all single-threaded, data in the page cache (warm-up run first, best of N).
# The figure of merit is CPU time (user+sys): on a shared machine wall time mostly measures the
# other jobs.
#
# Cases: (a) one 1 GiB file, (b) 20 000 small files in 100 directories. Generated in a temporary
# directory (under $TMPDIR, default /tmp) and removed afterwards.
#
# Usage: bench/nar-hash.sh [runs]     (default 3; needs nix-hash, nix-store, openssl)
set -euo pipefail
runs=${1:-3}
repo=$(cd "$(dirname "$0")/.." && pwd)

cargo build --quiet --release --manifest-path "$repo/Cargo.toml" -p stockade-common --example nar_hash
ours="$repo/target/release/examples/nar_hash"

work=$(mktemp -d "${TMPDIR:-/tmp}/nar-bench.XXXXXX")
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT

# SHA-NI: the CPU flag, and the sha2 crate's runtime-dispatched SHA-NI code in our binary.
if grep -qw sha_ni /proc/cpuinfo; then cpu=yes; else cpu=no; fi
if command -v objdump >/dev/null; then
  insns=$(objdump -d --no-show-raw-insn "$ours" | grep -c sha256rnds2 || true)
else
  insns="? (no objdump)"
fi
echo "CPU sha_ni: $cpu; sha256rnds2 instructions in nar_hash: $insns"

# Runs "$@" $runs times after a warm-up (page cache) and prints "<cpu> <wall>" of the run with the
# least CPU time (user+sys, i.e. the cost on one core; wall time suffers when other jobs share the
# machine), in seconds.
best() {
  local best_cpu="" best_wall="" out cpu
  "$@" >/dev/null
  for _ in $(seq "$runs"); do
    out=$( { TIMEFORMAT='%R %U %S'; time "$@" >/dev/null; } 2>&1 )
    read -r wall user sys <<<"$out"
    cpu=$(echo "$user + $sys" | bc -l)
    if [ -z "$best_cpu" ] || [ "$(echo "$cpu < $best_cpu" | bc -l)" = 1 ]; then
      best_cpu=$cpu best_wall=$wall
    fi
  done
  printf '%.3f %.3f' "$best_cpu" "$best_wall"
}

ratio() { printf '%.2f' "$(echo "$1 / $2" | bc -l)"; }

bench_case() {
  local label=$1 path=$2 rawfile=$3
  # Same answer first.
  local mine theirs
  mine=$("$ours" "$path" | cut -d' ' -f1)
  theirs="sha256:$(nix-hash --type sha256 "$path")"
  if [ "$mine" != "$theirs" ]; then
    echo "HASH MISMATCH for $label: ours $mine, nix-hash $theirs" >&2
    exit 1
  fi
  local c_ours w_ours c_nix w_nix c_ssl w_ssl
  read -r c_ours w_ours <<<"$(best "$ours" "$path")"
  read -r c_nix w_nix <<<"$(best nix-hash --type sha256 "$path")"
  read -r c_ssl w_ssl <<<"$(best openssl dgst -sha256 "$rawfile")"
  echo "$label (seconds: CPU user+sys, wall in brackets; best of $runs)"
  printf '  ours %s [%s]   nix-hash %s [%s]   openssl %s [%s]\n' \
    "$c_ours" "$w_ours" "$c_nix" "$w_nix" "$c_ssl" "$w_ssl"
  printf '  CPU ratios: nix-hash/ours %s   ours/openssl %s   (wall: %s, %s)\n' \
    "$(ratio "$c_nix" "$c_ours")" "$(ratio "$c_ours" "$c_ssl")" \
    "$(ratio "$w_nix" "$w_ours")" "$(ratio "$w_ours" "$w_ssl")"
}

# (a) one 1 GiB file. openssl hashes the file itself: the NAR adds ~120 bytes of framing.
mkdir "$work/big"
head -c $((1 << 30)) /dev/urandom >"$work/big/blob"
bench_case "1 GiB file" "$work/big" "$work/big/blob"
rm -rf "$work/big"

# (b) 20 000 small files (0..~1.5 KiB) in 100 directories, some executable.
mkdir "$work/small"
line="0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
bodies=("")
for n in $(seq 1 24); do bodies+=("${bodies[n - 1]}$line"); done
for d in $(seq 0 99); do
  mkdir "$work/small/d$d"
  for f in $(seq 0 199); do
    printf '%s %s\n' "$d.$f" "${bodies[(d * 200 + f) % 25]}" >"$work/small/d$d/file-$f"
  done
  chmod +x "$work/small/d$d/file-0"
done
nix-store --dump "$work/small" >"$work/small.nar"
echo "small tree: $(find "$work/small" -type f | wc -l) files, NAR $(stat -c %s "$work/small.nar") bytes"
bench_case "20k small files" "$work/small" "$work/small.nar"
