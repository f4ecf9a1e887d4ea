#!/usr/bin/env bash
# Regenerates proxy/layout/remora-proxy.order: the functions remora-proxy runs at start-up and
# on its request paths, which the release link lays out first and together (proxy/build.rs).
#
# Why: the kernel maps an executable's text in whole page-cache folios (64 KiB and up on ext4),
# so the pages a process holds depend on how spread out the code it ran is, not on how much it
# ran. Left to the linker, the ~2,000 functions a sidecar runs lie scattered
# across 7.3 MB of text: 3.8 MiB of resident text when idle. Laid out together they hold
# 1.1 MiB, and the request path shares fewer iTLB entries and cache lines with cold code.
#
# How: callgrind (valgrind) records every function the release binary executes in two runs:
#   1. start-up to ready and shutdown, with an identity (what every idle sidecar ran);
#   2. two proxies with mTLS between them, carrying HTTP/2, HTTP/1.1 and gRPC, plus admin.
# The order file lists run 1's functions first, then run 2's others (each sorted by name, so a
# refresh diffs cleanly). Symbols carry rustc's hashes: a new compiler or a dependency update
# renames some, and those are laid out as if unlisted (nothing breaks; the benefit shrinks).
# `benches compare` reports how many listed symbols the binary it measured still has; refresh
# when that falls, with the shipped profile (no CARGO_PROFILE_RELEASE_* overrides).
#
# Usage: bash proxy/layout/refresh.sh        (needs valgrind, h2load: benches/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
for tool in valgrind h2load python3 nm curl; do
  command -v $tool >/dev/null || { echo "refresh.sh needs $tool (valgrind: apt-get install valgrind; h2load: bash benches/setup.sh)" >&2; exit 1; }
done
# The order must come from the shipped profile: an override would record other symbol names.
if compgen -v CARGO_PROFILE_RELEASE_ >/dev/null || [ -n "${RUSTFLAGS:-}" ]; then
  echo "unset CARGO_PROFILE_RELEASE_* and RUSTFLAGS first: the order must come from the shipped profile" >&2
  exit 1
fi

work=$(mktemp -d)
pids=(0)
# By the time this runs, every profile needed has been written (stop waited for its proxy).
cleanup() { for p in "${pids[@]}"; do [ "$p" = 0 ] || kill -KILL "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# Two builds, two sets of names: cargo enables a dependency's features per build command, and
# features change its symbols' hashes. `cargo build --release -p remora-proxy` (as it ships, and
# what `benches compare` measures) and a build at the workspace root (which adds the features
# the tests use) each get their symbols listed; the link skips the other build's.
bin=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release
mkdir -p "$work/package" "$work/workspace"
cargo build --release -p remora-proxy --bin remora-proxy
cp "$bin/remora-proxy" "$work/package/"
cargo build --release --bin remora-proxy --bin benches --bin remora
cp "$bin/remora-proxy" "$work/workspace/"

"$bin/remora" ca init --out "$work/ca" >/dev/null
"$bin/remora" cert issue --identity spiffe://cluster.local/ns/default/sa/web --ca "$work/ca" --out "$work/web" >/dev/null
"$bin/remora" cert issue --identity spiffe://cluster.local/ns/default/sa/client --ca "$work/ca" --out "$work/client" >/dev/null

# Fixed ports on loopback; tests and benches bind port 0 instead.
app=127.0.0.1:29101
"$bin/benches" backend 29101 >/dev/null 2>&1 &
pids+=($!)
disown $! # no "Killed" notice when cleanup ends it
for _ in $(seq 50); do curl -sf -o /dev/null "http://$app/small" && break; sleep 0.1; done
curl -sf -o /dev/null "http://$app/small" || { echo "the backend on $app did not start (port taken?)" >&2; exit 1; }

# A proxy under callgrind; $1 names the profile, the rest is its environment.
proxy() {
  local name=$1; shift
  env REMORA_APP_ADDR=$app "$@" valgrind --tool=callgrind --demangle=no \
    --callgrind-out-file="$work/$variant/$name.cg" "$work/$variant/remora-proxy" >"$work/$variant/$name.log" 2>&1 &
  pids+=($!)
}
ready() {
  for _ in $(seq 300); do curl -sf -o /dev/null "http://$1/ready" && return 0; sleep 0.2; done
  echo "proxy at $1 did not become ready" >&2; exit 1
}
stop() { kill -TERM "$1" || { echo "proxy $1 died before its profile was complete: see $work/$variant/*.log" >&2; exit 1; }; wait "$1" || true; }
# A profile of failures would lay out error paths: every load must succeed.
load() {
  local out; out=$("$@" 2>&1) || { echo "$out" >&2; exit 1; }
  echo "$out" | grep -q ' 0 failed, 0 errored, 0 timeout' || { echo "requests failed: $*" >&2; echo "$out" >&2; exit 1; }
  echo "$out" | grep '^requests'
}

# Records $variant's profiles.
profile() {
  # 1. Start-up and shutdown.
  proxy start REMORA_INBOUND_ADDR=127.0.0.1:29102 REMORA_OUTBOUND_ADDR=127.0.0.1:29103 \
    REMORA_ADMIN_ADDR=127.0.0.1:29104 REMORA_IDENTITY_DIR="$work/web"
  start=${pids[-1]}
  ready 127.0.0.1:29104
  stop "$start"

  # 2. Traffic: client proxy --mTLS--> server proxy --> backend.
  proxy server REMORA_INBOUND_ADDR=127.0.0.1:29102 REMORA_OUTBOUND_ADDR=127.0.0.1:29103 \
    REMORA_ADMIN_ADDR=127.0.0.1:29104 REMORA_IDENTITY_DIR="$work/web"
  server=${pids[-1]}
  proxy client REMORA_INBOUND_ADDR=127.0.0.1:29112 REMORA_OUTBOUND_ADDR=127.0.0.1:29113 \
    REMORA_ADMIN_ADDR=127.0.0.1:29114 REMORA_IDENTITY_DIR="$work/client" \
    REMORA_DESTINATIONS="echo.test:80=127.0.0.1:29102#spiffe://cluster.local/ns/default/sa/web"
  client=${pids[-1]}
  ready 127.0.0.1:29104
  ready 127.0.0.1:29114
  load h2load -c 4 -m 4 -n 2000 -H ':authority: echo.test:80' http://127.0.0.1:29113/small
  load h2load --h1 -c 4 -n 1000 -H ':authority: echo.test:80' http://127.0.0.1:29113/small
  # "OK ERRORS p50 p99 p99.9 SENT"
  grpc=$("$bin/benches" grpc-load 127.0.0.1:29113 echo.test:80 200 3 2 | tail -1)
  [ "$(echo "$grpc" | awk '{print $2}')" = 0 ] || { echo "gRPC calls failed: $grpc" >&2; exit 1; }
  echo "gRPC: $grpc"
  load h2load -c 2 -m 4 -n 1000 http://127.0.0.1:29102/small
  # Many streams at once, and 1,000 held open at a slow backend: the paths where h2's queues,
  # slabs and windows grow. Left out, a sidecar under such load faults in 2 MiB more text
  # (cold functions scattered over 64 KiB page-cache folios), measured with 1,000 streams.
  load h2load -c 10 -m 100 -n 3000 http://127.0.0.1:29102/small
  load h2load -c 10 -m 100 -n 1000 http://127.0.0.1:29102/slow
  curl -sf -o /dev/null http://127.0.0.1:29104/metrics
  curl -sf -o /dev/null http://127.0.0.1:29114/metrics
  # Connections that close before a request (TCP probes, load balancers' checks, the
  # benchmarks' own port waits) and a request cut short: the detection's refusal paths.
  for port in 29102 29103 29113; do
    for _ in 1 2 3; do (exec 3<>/dev/tcp/127.0.0.1/$port; exec 3>&-) 2>/dev/null || true; done
    (exec 3<>/dev/tcp/127.0.0.1/$port; printf 'GET / HTTP/1.1\r\nHo' >&3; exec 3>&-) 2>/dev/null || true
  done
  curl -s -o /dev/null http://127.0.0.1:29104/no-such-page || true
  stop "$client"
  stop "$server"
}
for variant in workspace package; do profile; done

# The functions each profile ran in remora-proxy, by symbol name.
python3 - "$work" proxy/layout/remora-proxy.order workspace package <<'EOF'
import re, subprocess, sys
work, out, variants = sys.argv[1], sys.argv[2], sys.argv[3:]
def ran(variant, profile):
    objs, fns, ob, ids = {}, {}, None, set()
    for line in open(f"{work}/{variant}/{profile}.cg"):
        m = re.match(r"^(c?ob|c?fn)=\((\d+)\)(?: (.*))?", line)
        if not m:
            continue
        kind, i, name = m.groups()
        if kind.endswith("ob"):
            if name:
                objs[i] = name.strip()
            if kind == "ob":
                ob = objs.get(i)
        else:
            if name:
                # callgrind marks recursion levels as NAME'2.
                fns[i] = re.sub(r"'[0-9]+$", "", name.strip())
            if kind == "fn" and ob and ob.endswith("/remora-proxy"):
                ids.add(i)
    return {fns[i] for i in ids if i in fns}
starts, rests = [], []
for v in variants:
    nm = subprocess.run(["nm", f"{work}/{v}/remora-proxy"], capture_output=True, text=True, check=True)
    symbols = {p[2] for p in (l.split() for l in nm.stdout.splitlines()) if len(p) == 3 and p[1] in "tTwW"}
    start = ran(v, "start") & symbols
    starts.append(sorted(start))
    rests.append(sorted((ran(v, "server") | ran(v, "client")) & symbols - start))
    print(f"{v} build: {len(start)} start-up functions, then {len(rests[-1])} on the request paths")
# Each name once, in the order first met: both builds' start-up, then both request paths.
listed = list(dict.fromkeys(s for group in starts + rests for s in group))
# LLD skips `#` lines; benches/src/layout.rs reads the counts to judge a binary's coverage.
header = "# remora-proxy's text layout: written by proxy/layout/refresh.sh, read by proxy/build.rs\n"
header += "".join(f"# build {v} {len(s) + len(r)}\n" for v, s, r in zip(variants, starts, rests))
with open(out, "w") as f:
    f.write(header + "".join(s + "\n" for s in listed))
print(f"{out}: {len(listed)} functions")
EOF
