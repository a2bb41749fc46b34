#!/usr/bin/env bash
# Profiles the timed runs of one workload, recording only while a timed run of the chosen side
# is in progress (the driver's STOCKADE_BENCH_HOOK), and prints where the time went.
#   bench/profile.sh perf   WORKLOAD [stockade|nix|both] [stockade-bench options...]
#       perf record -a -g (cpu-clock); prints time per process and per symbol.
#   bench/profile.sh strace WORKLOAD [stockade|nix] [stockade-bench options...]
#       strace -c -f of the daemon's processes (all of them, attached before each timed run);
#       prints syscall counts and times per daemon. STRACE_OPTS=-ttt instead: a timestamped
#       trace of every call (the tail of an add: what runs after the last byte arrives).
# e.g. bench/profile.sh perf query-info stockade --runs 5
# Needs root, and perf or strace. Results stay in the printed directory.
set -euo pipefail
cd "$(dirname "$0")/.."
tool=${1:?usage: bench/profile.sh perf|strace WORKLOAD [side] [options...]}
workload=${2:?usage: bench/profile.sh perf|strace WORKLOAD [side] [options...]}
side=${3:-stockade}
shift $(($# >= 3 ? 3 : 2))
if [ -d "$HOME/.cargo/bin" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
cargo build --release -p stockade-master -p stockade-broker -p stockade-store-writer \
  -p stockade-builder-helper -p stockade-roots-reader -p stockade-tests --bin stockade \
  --bin stockade-broker --bin stockade-store-writer --bin stockade-builder-helper \
  --bin stockade-roots-reader --bin stockade-bench >&2
out=$(mktemp -d "${TMPDIR:-/tmp}/stockade-profile.XXXXXX")
hook="$out/hook.sh"
export STOCKADE_BIN="$PWD/target/release/stockade" STOCKADE_BENCH_HOOK="$hook"
export STOCKADE_BENCH_HOOK_SIDE="$side"
bench=(target/release/stockade-bench -w "$workload" --warmup 0 "$@")

# Every process in the tree under $1 (the daemon and its children).
cat >"$out/tree.sh" <<'EOT'
#!/bin/sh
walk() { echo "$1"; for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do walk "$c"; done; }
walk "$1"
EOT
chmod +x "$out/tree.sh"

case $tool in
perf)
  mkfifo "$out/ctl"
  cat >"$hook" <<EOT
#!/bin/sh
case \$1 in start) echo enable >"$out/ctl" ;; stop) echo disable >"$out/ctl" ;; esac
EOT
  chmod +x "$hook"
  perf record -o "$out/perf.data" -a -g -e cpu-clock -F 4000 -D -1 --control "fifo:$out/ctl" \
    -- "${bench[@]}"
  perf report -i "$out/perf.data" --sort comm --stdio --no-children -g none 2>/dev/null |
    grep -E '^ +[0-9]' | head -15
  perf report -i "$out/perf.data" --sort comm,dso,symbol --stdio --no-children -g none \
    2>/dev/null | grep -E '^ +[0-9]' | head -40 | cut -c1-150
  echo "perf data: $out/perf.data"
  ;;
strace)
  # Attach strace -f to every process of the daemon at start (new children are followed);
  # stop it (SIGINT: it prints its summary) at stop.
  cat >"$hook" <<EOT
#!/bin/bash
set -e
if [ "\$1" = start ]; then
  args=()
  for p in \$("$out/tree.sh" "\$3"); do args+=(-p "\$p"); done
  n=\$(ls "$out" | grep -c '^strace-' || true)
  strace -f ${STRACE_OPTS:--c -S calls} -o "$out/strace-\$2-\$n.txt" "\${args[@]}" 2>/dev/null &
  echo \$! >"$out/strace.pid"
  # strace attaches before it prints anything; wait until every task is attached.
  for _ in \$(seq 200); do
    t=\$(grep -l "^TracerPid:[[:space:]]*\$!\$" /proc/"\$3"/task/*/status 2>/dev/null | wc -l)
    [ "\$t" -gt 0 ] && break
    sleep 0.01
  done
else
  kill -INT "\$(cat "$out/strace.pid")"
  while kill -0 "\$(cat "$out/strace.pid")" 2>/dev/null; do sleep 0.01; done
fi
EOT
  chmod +x "$hook"
  "${bench[@]}"
  for f in "$out"/strace-*.txt; do echo "== $f"; head -25 "$f"; done
  ;;
*) echo "unknown tool $tool (perf or strace)" >&2; exit 2 ;;
esac
