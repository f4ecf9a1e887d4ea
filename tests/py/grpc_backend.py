"""A gRPC backend for remora's end-to-end tests, on the real grpcio server.

Service remora.test.Echo, raw bytes (no protobuf needed):
  Unary   echoes the request; initial metadata `backend: NAME`, trailing `backend-trailer: NAME`
  Stream  request is `N[:MS]`; streams N messages `NAME:i`, MS milliseconds apart
  Fail    request is `CODE:DETAILS`; aborts with that status and trailing metadata `x-fail-detail`
  Slow    request is an ASCII number of milliseconds to sleep before echoing
Prints `PORT <n>` once serving.
"""
import argparse
import sys
import time
from concurrent import futures

import grpc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--unix", help="serve on this Unix socket path instead (prints PORT 0)")
    ap.add_argument("--name", default="backend")
    ap.add_argument("--delay-ms", type=int, default=0, help="added to every Unary call")
    ap.add_argument("--max-age-ms", type=int, default=0, help="grpc.max_connection_age_ms (GOAWAY)")
    args = ap.parse_args()
    name = args.name

    def unary(req, ctx):
        if args.delay_ms:
            time.sleep(args.delay_ms / 1000.0)
        ctx.send_initial_metadata((("backend", name),))
        ctx.set_trailing_metadata((("backend-trailer", name),))
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

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
    }
    options = []
    if args.max_age_ms:
        options += [("grpc.max_connection_age_ms", args.max_age_ms),
                    ("grpc.max_connection_age_grace_ms", 30000)]
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
