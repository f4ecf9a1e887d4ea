"""gRPC calls with a deadline, for the fault tests: one grpcio channel, raw-bytes Unary calls.

  grpc_deadline.py TARGET --authority A --deadline-ms D N C
      N unary calls to /remora.test.Echo/Unary, C in flight at a time, each with a D ms
      deadline. Prints one JSON line: {"codes": {...}, "backends": {...}, "details": [...],
      "deadline_s": [min, max] (how long the DEADLINE_EXCEEDED calls took), "ok_max_s",
      "total_s"}.
"""
import argparse
import collections
import json
import threading
import time

import grpc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--authority", required=True)
    ap.add_argument("--deadline-ms", type=int, required=True)
    ap.add_argument("n", type=int)
    ap.add_argument("c", type=int)
    args = ap.parse_args()
    opts = [("grpc.enable_retries", 0), ("grpc.default_authority", args.authority)]
    ch = grpc.insecure_channel(args.target, options=opts)
    method = ch.unary_unary("/remora.test.Echo/Unary")
    codes = collections.Counter()
    backends = collections.Counter()
    details = []
    deadline_took = []
    ok_took = []
    lock = threading.Lock()
    remaining = [args.n]

    def worker():
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            start = time.monotonic()
            try:
                _, call = method.with_call(b"x", timeout=args.deadline_ms / 1000.0)
                took = time.monotonic() - start
                with lock:
                    codes["OK"] += 1
                    backends[dict(call.initial_metadata()).get("backend")] += 1
                    ok_took.append(took)
            except grpc.RpcError as e:
                took = time.monotonic() - start
                with lock:
                    codes[e.code().name] += 1
                    details.append(e.details())
                    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        deadline_took.append(took)

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(args.c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = {
        "codes": codes,
        "backends": backends,
        "details": details[:3],
        "deadline_s": [min(deadline_took), max(deadline_took)] if deadline_took else None,
        "ok_max_s": max(ok_took) if ok_took else None,
        "total_s": time.monotonic() - started,
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
