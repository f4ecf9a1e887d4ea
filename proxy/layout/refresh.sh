#!/usr/bin/env bash
# Regenerates proxy/layout/remora-proxy.order: the functions remora-proxy runs at start-up and
# on its request paths, which the release link lays out first and together (proxy/build.rs).
#
# Why: the kernel maps an executable's text in whole page-cache folios (64 KiB and up on ext4),
# so the pages a process holds depend on how spread out the code it ran is, not on how much it
# ran. Left to the linker, the ~2,000 functions a sidecar runs lie scattered
# across 7.3 MB of text: 3.8 MiB of resident text when idle. Laid out together they hold
# 1.3 MiB, and the request path shares fewer iTLB entries and cache lines with cold code.
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
command -v valgrind >/dev/null || { echo "refresh.sh needs valgrind: apt-get install valgrind" >&2; exit 1; }
command -v h2load >/dev/null || { echo "refresh.sh needs h2load: bash benches/setup.sh" >&2; exit 1; }
# The layout only applies to the shipped profile: a profile override would record other names.
env | grep -q '^CARGO_PROFILE_RELEASE_' && { echo "unset CARGO_PROFILE_RELEASE_* first: the order must come from the shipped profile" >&2; exit 1; }

cargo build --release --bin remora-proxy --bin benches --bin remora
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

"$bin/remora" ca init --out "$work/ca" >/dev/null
"$bin/remora" cert issue --identity spiffe://cluster.local/ns/default/sa/web --ca "$work/ca" --out "$work/web" >/dev/null
"$bin/remora" cert issue --identity spiffe://cluster.local/ns/default/sa/client --ca "$work/ca" --out "$work/client" >/dev/null

# Ports on loopback no test uses (tests bind port 0; benches use 19xxx).
app=127.0.0.1:29101
"$bin/benches" backend 29101 >/dev/null 2>&1 &
pids+=($!)

# A proxy under callgrind; $1 names the profile, the rest is its environment.
proxy() {
  local name=$1; shift
  env REMORA_APP_ADDR=$app "$@" valgrind --tool=callgrind --demangle=no \
    --callgrind-out-file="$work/$name.cg" "$bin/remora-proxy" >"$work/$name.log" 2>&1 &
  pids+=($!)
}
ready() {
  for _ in $(seq 300); do curl -sf -o /dev/null "http://$1/ready" && return 0; sleep 0.2; done
  echo "proxy at $1 did not become ready" >&2; exit 1
}
stop() { kill -TERM "$1"; wait "$1" || true; }

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
h2load -c 4 -m 4 -n 2000 -H ':authority: echo.test:80' http://127.0.0.1:29113/small | grep '^requests'
h2load --h1 -c 4 -n 1000 -H ':authority: echo.test:80' http://127.0.0.1:29113/small | grep '^requests'
"$bin/benches" grpc-load 127.0.0.1:29113 echo.test:80 200 3 2 | tail -1
h2load -c 2 -m 4 -n 1000 http://127.0.0.1:29102/small | grep '^requests'
curl -sf -o /dev/null http://127.0.0.1:29104/metrics
curl -sf -o /dev/null http://127.0.0.1:29114/metrics
stop "$client"
stop "$server"

# The functions each profile ran in remora-proxy, by symbol name.
python3 - "$work" "$bin/remora-proxy" proxy/layout/remora-proxy.order <<'EOF'
import re, subprocess, sys
work, binary, out = sys.argv[1:4]
def ran(profile):
    objs, fns, ob, ids = {}, {}, None, set()
    for line in open(f"{work}/{profile}.cg"):
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
symbols = set()
for line in subprocess.run(["nm", binary], capture_output=True, text=True, check=True).stdout.splitlines():
    parts = line.split()
    if len(parts) == 3 and parts[1] in "tTwW":
        symbols.add(parts[2])
start = ran("start") & symbols
rest = (ran("server") | ran("client")) & symbols - start
with open(out, "w") as f:
    f.write("".join(s + "\n" for s in sorted(start) + sorted(rest)))
print(f"{out}: {len(start)} start-up functions, then {len(rest)} on the request paths")
EOF
