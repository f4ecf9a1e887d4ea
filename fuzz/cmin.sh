#!/usr/bin/env bash
# Minimizes corpus-work/<target> (what long-run.sh grew) into the committed corpus/<target>:
# libFuzzer's set-cover merge on edges (the equivalent of `cargo fuzz cmin`, run on the built
# binary so it needs no rebuild), then at most 200 files: the seeds (seeds/<target>, from
# seedgen/) are always kept, the largest other inputs dropped first.
#   usage: bash fuzz/cmin.sh [TARGET...]
set -euo pipefail
cd "$(dirname "$0")"
bin=${BIN:-target/x86_64-unknown-linux-gnu/release}
for t in "$@"; do
  rm -rf "corpus/$t"
  mkdir -p "corpus/$t"
  extra=()
  case $t in detect | client_hello) extra=(-max_len=17000) ;; esac
  nice -n 19 "$bin/$t" -set_cover_merge=1 -use_counters=0 -rss_limit_mb=2048 "${extra[@]}" \
    "corpus/$t" "corpus-work/$t" > "/tmp/cmin-$t.log" 2>&1
  seeds=()
  [ -d "seeds/$t" ] && seeds=("seeds/$t"/*)
  for s in "${seeds[@]}"; do rm -f "corpus/$t/$(sha1sum "$s" | cut -d' ' -f1)"; done
  keep=$((200 - ${#seeds[@]}))
  n=$(ls "corpus/$t" | wc -l)
  if [ "$n" -gt "$keep" ]; then
    ls -S "corpus/$t" | head -n $((n - keep)) | sed "s|^|corpus/$t/|" | xargs rm
  fi
  [ ${#seeds[@]} -gt 0 ] && cp "${seeds[@]}" "corpus/$t/"
  echo "$t: $(ls "corpus/$t" | wc -l) files, $(du -sb "corpus/$t" | cut -f1) bytes"
done
