"""A gRPC client for remora's idle-timeout test: one call on a grpcio channel, raw bytes.

  grpc_idle.py TARGET --authority A server METHOD        a server stream (request b"go")
  grpc_idle.py TARGET --authority A client METHOD N MS   a client stream of N messages, MS ms
                                                         apart; the answer is one message
Prints {"messages": [...], "code": NAME, "details": TEXT, "seconds": ELAPSED} as JSON; a call
that fails is reported (code, details), not raised, since failing is what some tests expect.
"""
import argparse
import json
import time

import grpc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--authority", required=True)
    ap.add_argument("mode", choices=["server", "client"])
    ap.add_argument("method")
    ap.add_argument("n", nargs="?", type=int, default=0)
    ap.add_argument("ms", nargs="?", type=int, default=0)
    args = ap.parse_args()
    opts = [("grpc.enable_retries", 0), ("grpc.default_authority", args.authority)]
    ch = grpc.insecure_channel(args.target, options=opts)
    got, code, details = [], "OK", ""
    start = time.monotonic()
    try:
        if args.mode == "server":
            for m in ch.unary_stream(args.method)(b"go", timeout=20):
                got.append(m.decode())
        else:
            def upload():
                for i in range(args.n):
                    if i:
                        time.sleep(args.ms / 1000.0)
                    yield b"m%d" % i

            got.append(ch.stream_unary(args.method)(upload(), timeout=20).decode())
    except grpc.RpcError as e:
        code, details = e.code().name, e.details()
    out = {"messages": got, "code": code, "details": details,
           "seconds": time.monotonic() - start}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
