#!/usr/bin/env bash
# CI's fuzz smoke: builds every fuzz target and runs each for FUZZ_SECONDS (default 20) over
# its committed corpus (fuzz/corpus/<target>, copied first so the run does not grow it),
# two at a time. Fails when any target crashes (the input is kept under fuzz/artifacts/).
# Long runs and their figures: fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")"
secs=${FUZZ_SECONDS:-20}
targets=(detect client_hello scrub authority destinations file_source certs csr)

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# Stable toolchain: cargo-fuzz's -Z flags need RUSTC_BOOTSTRAP. A short smoke run gains little
# from optimisation, and the optimised instrumented build alone took over 12 min here: an
# unoptimised build (debug assertions on), no sanitizer (the code is safe Rust; what is looked
# for is panics and failed assertions) and no debug info keep it short.
CARGO_PROFILE_DEV_DEBUG=0 RUSTC_BOOTSTRAP=1 cargo fuzz build --dev --sanitizer none
bin=target/x86_64-unknown-linux-gnu/debug

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
run() {
  local t=$1
  mkdir -p "$work/$t" artifacts/$t
  local extra=()
  case $t in detect | client_hello) extra=(-max_len=17000) ;; esac
  if "$bin/$t" "$work/$t" "corpus/$t" -max_total_time="$secs" -rss_limit_mb=2048 \
    -artifact_prefix="artifacts/$t/" "${extra[@]}" > "$work/$t.log" 2>&1; then
    echo "fuzz $t: ok, $(grep -o 'DONE.*' "$work/$t.log" | tr -s ' ' | cut -d' ' -f1-7 | tail -1)"
  else
    echo "fuzz $t: CRASHED"
    grep -E -A15 'panicked|ERROR: libFuzzer' "$work/$t.log" | head -40
    grep 'Test unit written' "$work/$t.log" || true
    return 1
  fi
}
failed=0
passed=0
for ((i = 0; i < ${#targets[@]}; i += 2)); do
  pids=()
  for t in "${targets[@]:i:2}"; do
    run "$t" > "$work/$t.out" 2>&1 &
    pids+=("$!:$t")
  done
  for p in "${pids[@]}"; do
    if wait "${p%%:*}"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
    cat "$work/${p#*:}.out"
  done
done
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
