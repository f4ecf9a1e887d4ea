#!/usr/bin/env bash
# The long runs behind the figures in README.md: each target for SECONDS_EACH seconds of
# fuzzing (default 480), single job, niced, over corpus-work/<target> (seeded from seeds/, see
# README.md). A crash stops libFuzzer; the run is then started again for the time left (at most
# 3 times), so one shallow bug does not end a target's share. Logs go to LOGS (default
# /tmp/remora-fuzz-logs), one per run: <target>.<n>.log.
#   usage: bash fuzz/long-run.sh [TARGET...]
set -uo pipefail
cd "$(dirname "$0")"
each=${SECONDS_EACH:-480}
logs=${LOGS:-/tmp/remora-fuzz-logs}
bin=${BIN:-target/x86_64-unknown-linux-gnu/release}
mkdir -p "$logs"
for t in "$@"; do
  mkdir -p "corpus-work/$t" "artifacts/$t"
  left=$each
  extra=()
  case $t in detect|client_hello) extra=(-max_len=17000) ;; esac
  for n in 1 2 3 4; do
    start=$(date +%s)
    nice -n 19 "$bin/$t" "corpus-work/$t" -max_total_time="$left" -rss_limit_mb=2048 \
      -artifact_prefix="artifacts/$t/" -print_final_stats=1 "${extra[@]}" > "$logs/$t.$n.log" 2>&1
    rc=$?
    used=$(( $(date +%s) - start ))
    left=$(( left - used ))
    echo "$t run $n: rc=$rc ${used}s" >> "$logs/summary"
    [ "$rc" -eq 0 ] && break
    [ "$left" -le 10 ] && break
  done
done
