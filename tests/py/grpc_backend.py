"""A gRPC backend for remora's end-to-end tests, on the real grpcio server.

Service remora.test.Echo, raw bytes (no protobuf needed):
  Unary   echoes the request; initial metadata `backend: NAME`, trailing `backend-trailer: NAME`
          (and `x-big-sha256`: the SHA-256 of the request's `x-big` metadata, when it has one)
  Stream  request is `N[:MS]`; streams N messages `NAME:i`, MS milliseconds apart
  Fail    request is `CODE:DETAILS`; aborts with that status and trailing metadata `x-fail-detail`
  Slow    request is an ASCII number of milliseconds to sleep before echoing
  Collect client streaming; answers `NAME:COUNT:BYTES` and the messages joined by `,`
          (messages of at most 64 bytes only), initial metadata `backend: NAME`
  Chat    bidirectional; answers each message `m` with `NAME:m` as it arrives
  Hang    server streaming; request is an ID: sends `NAME:ready`, then waits (up to 60 s)
          until the client cancels, which it records under that ID
  Seen    request is an ID; answers `cancelled` once Hang saw that ID's call cancelled,
          else `active`/`unknown`
  Digest  answers with `LEN:SHA256-HEX` of the request (checks a big upload whole)
  Blob    request is `LEN`; answers LEN bytes of the pattern `blob_bytes` (a big download)
Prints `PORT <n>` once serving. `--max-message-mb` raises grpcio's 4 MiB message limit.
"""
import argparse
import hashlib
import sys
import threading
import time
from concurrent import futures

import grpc


def blob_bytes(n):
    """N deterministic bytes (a counter pattern), shared with grpc_client.py's check."""
    unit = bytes(range(251))  # a prime length, so no power-of-two boundary hides a shift
    return (unit * (n // len(unit) + 1))[:n]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--unix", help="serve on this Unix socket path instead (prints PORT 0)")
    ap.add_argument("--name", default="backend")
    ap.add_argument("--delay-ms", type=int, default=0, help="added to every Unary call")
    ap.add_argument("--max-age-ms", type=int, default=0, help="grpc.max_connection_age_ms (GOAWAY)")
    ap.add_argument("--max-message-mb", type=int, default=0,
                    help="grpc.max_{send,receive}_message_length in MiB (0: grpcio's default)")
    args = ap.parse_args()
    name = args.name
    hangs = {}
    hangs_lock = threading.Lock()

    def unary(req, ctx):
        if args.delay_ms:
            time.sleep(args.delay_ms / 1000.0)
        ctx.send_initial_metadata((("backend", name),))
        trailing = [("backend-trailer", name)]
        big = dict(ctx.invocation_metadata()).get("x-big")
        if big is not None:
            trailing.append(("x-big-sha256", hashlib.sha256(big.encode()).hexdigest()))
        ctx.set_trailing_metadata(tuple(trailing))
        return req

    def stream(req, ctx):
        n, _, ms = req.decode().partition(":")
        for i in range(int(n or "0")):
            if ms and i:
                time.sleep(int(ms) / 1000.0)
            yield f"{name}:{i}".encode()

    def fail(req, ctx):
        code, _, details = req.decode().partition(":")
        status = next(s for s in grpc.StatusCode if s.value[0] == int(code))
        ctx.set_trailing_metadata((("x-fail-detail", "because-" + name),))
        ctx.abort(status, details)

    def slow(req, ctx):
        time.sleep(int(req.decode() or "0") / 1000.0)
        ctx.send_initial_metadata((("backend", name),))
        return req

    def collect(reqs, ctx):
        ctx.send_initial_metadata((("backend", name),))
        msgs = list(reqs)
        small = [m.decode(errors="replace") for m in msgs if len(m) <= 64]
        total = sum(len(m) for m in msgs)
        return f"{name}:{len(msgs)}:{total}:{','.join(small)}".encode()

    def chat(reqs, ctx):
        for m in reqs:
            yield name.encode() + b":" + m

    def hang(req, ctx):
        call_id = req.decode()
        done = threading.Event()
        with hangs_lock:
            hangs[call_id] = "active"

        def on_done():
            with hangs_lock:
                if hangs.get(call_id) == "active" and not ctx.is_active():
                    hangs[call_id] = "cancelled"
            done.set()

        ctx.add_callback(on_done)
        yield f"{name}:ready".encode()
        # Block until the RPC ends (the client cancels); never answers more on its own.
        if not done.wait(60):
            with hangs_lock:
                hangs[call_id] = "timed out"

    def seen(req, ctx):
        with hangs_lock:
            return hangs.get(req.decode(), "unknown").encode()

    def digest(req, ctx):
        ctx.send_initial_metadata((("backend", name),))
        return f"{len(req)}:{hashlib.sha256(req).hexdigest()}".encode()

    def blob(req, ctx):
        ctx.send_initial_metadata((("backend", name),))
        return blob_bytes(int(req.decode()))

    handlers = {
        "Collect": grpc.stream_unary_rpc_method_handler(collect),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
        "Hang": grpc.unary_stream_rpc_method_handler(hang),
        "Seen": grpc.unary_unary_rpc_method_handler(seen),
        "Digest": grpc.unary_unary_rpc_method_handler(digest),
        "Blob": grpc.unary_unary_rpc_method_handler(blob),
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
    }
    options = []
    if args.max_age_ms:
        options += [("grpc.max_connection_age_ms", args.max_age_ms),
                    ("grpc.max_connection_age_grace_ms", 30000)]
    if args.max_message_mb:
        limit = args.max_message_mb * 1024 * 1024
        options += [("grpc.max_send_message_length", limit),
                    ("grpc.max_receive_message_length", limit)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("remora.test.Echo", handlers),))
    if args.unix:
        server.add_insecure_port(f"unix:{args.unix}")
        port = 0
    else:
        port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"PORT {port}", flush=True)
    # Exit when the parent closes stdin, so no backend outlives its test.
    sys.stdin.read()
    server.stop(0)


if __name__ == "__main__":
    main()
