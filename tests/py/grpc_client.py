"""A gRPC client for remora's end-to-end tests: one grpcio channel, raw-bytes methods.

  grpc_client.py TARGET [--authority A] check      unary, server streaming, non-OK status with
                                                   trailing metadata; prints a JSON report
  grpc_client.py TARGET [--authority A] unary N    N unary calls; prints per-backend counts and
                                                   status codes as JSON
  grpc_client.py TARGET [--authority A] concurrent N C
                                                   N unary calls, C in flight at a time on the
                                                   one channel; same report plus latencies
  grpc_client.py TARGET [--authority A] idle N MS   N unary calls on the one channel, MS apart
                                                   (the connection idles between them), each
                                                   with 6,000 bytes of metadata and 1 MiB both
                                                   ways, checked whole; prints counts as JSON
  grpc_client.py TARGET [--authority A] stream N MS
                                                   one server stream of N messages MS apart
  grpc_client.py TARGET [--authority A] [--big-mb M] [--max-message-mb L] features
                                                   every call shape: client streaming,
                                                   bidirectional ping-pong, a cancelled server
                                                   stream (and whether the server saw the
                                                   cancellation), M MiB up, down and echoed
                                                   (checked whole); prints a JSON report
"""
import argparse
import collections
import hashlib
import json
import queue
import time
import uuid

import grpc


def call_unary(ch, payload, timeout=10):
    m = ch.unary_unary("/remora.test.Echo/Unary")
    return m.with_call(payload, timeout=timeout)


def blob_bytes(n):
    """The pattern grpc_backend.py's Blob sends (keep the two in step)."""
    unit = bytes(range(251))
    return (unit * (n // len(unit) + 1))[:n]


def features(ch, big):
    out = {}
    # Client streaming: five small messages, one answer.
    collect = ch.stream_unary("/remora.test.Echo/Collect")
    body, call = collect.with_call(iter([b"m%d" % i for i in range(5)]), timeout=20)
    out["client_stream"] = body.decode()
    out["client_stream_backend"] = dict(call.initial_metadata()).get("backend")

    # Bidirectional ping-pong: the next message goes out only after the previous answer came
    # back, so a hop that waited for the whole request (or response) would hang here.
    chat = ch.stream_stream("/remora.test.Echo/Chat")
    turn = queue.Queue()

    def pings():
        for i in range(5):
            yield b"ping%d" % i
            if turn.get(timeout=15) is None:
                return

    replies = []
    try:
        for m in chat(pings(), timeout=20):
            replies.append(m.decode())
            turn.put(True)
    except grpc.RpcError as e:
        replies.append("error " + e.code().name + ": " + (e.details() or ""))
    finally:
        turn.put(None)
    out["bidi"] = replies

    # Cancellation: the server stream sends one message, the client cancels, and the
    # server must see its call cancelled (through every hop in between).
    call_id = uuid.uuid4().hex
    stream = ch.unary_stream("/remora.test.Echo/Hang")(call_id.encode(), timeout=30)
    out["cancel_first"] = next(stream).decode()
    started = time.monotonic()
    stream.cancel()
    seen = ch.unary_unary("/remora.test.Echo/Seen")
    state = "unknown"
    while time.monotonic() - started < 15:
        state = seen(call_id.encode(), timeout=10).decode()
        if state != "active":
            break
        time.sleep(0.02)
    out["cancel_seen"] = state
    out["cancel_ms"] = round((time.monotonic() - started) * 1000)

    # Big messages: up (the server hashes what arrived), down (a known pattern), and echoed.
    chunk = hashlib.shake_256(b"remora").digest(1 << 16)
    up = (chunk * (big // len(chunk) + 1))[:big]
    digest = ch.unary_unary("/remora.test.Echo/Digest")
    try:
        got = digest(up, timeout=60).decode()
        out["big_up"] = got == f"{len(up)}:{hashlib.sha256(up).hexdigest()}"
        out["big_up_answer"] = got
    except grpc.RpcError as e:
        out["big_up"] = False
        out["big_up_answer"] = e.code().name + ": " + (e.details() or "")
    blob = ch.unary_unary("/remora.test.Echo/Blob")
    try:
        got = blob(str(big).encode(), timeout=60)
        out["big_down"] = got == blob_bytes(big)
        out["big_down_len"] = len(got)
    except grpc.RpcError as e:
        out["big_down"] = False
        out["big_down_len"] = e.code().name + ": " + (e.details() or "")
    try:
        got, _ = call_unary(ch, up, timeout=60)
        out["big_echo"] = got == up
        out["big_echo_len"] = len(got)
    except grpc.RpcError as e:
        out["big_echo"] = False
        out["big_echo_len"] = e.code().name + ": " + (e.details() or "")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--authority")
    ap.add_argument("mode")
    ap.add_argument("n", nargs="?", type=int, default=1)
    ap.add_argument("c", nargs="?", type=int, default=1)
    ap.add_argument("--method", default="Unary")
    ap.add_argument("--payload", default="")
    ap.add_argument("--tls", help="CA,CERT,KEY: mTLS to the proxy")
    ap.add_argument("--server-name", help="TLS server name to ask for and verify")
    ap.add_argument("--big-mb", type=int, default=16, help="features: the big message's size")
    ap.add_argument("--max-message-mb", type=int, default=0,
                    help="grpc.max_{send,receive}_message_length in MiB (0: grpcio's default)")
    args = ap.parse_args()
    opts = [("grpc.enable_retries", 0)]
    if args.max_message_mb:
        limit = args.max_message_mb * 1024 * 1024
        opts += [("grpc.max_send_message_length", limit),
                 ("grpc.max_receive_message_length", limit)]
    if args.authority:
        opts.append(("grpc.default_authority", args.authority))
    if args.tls:
        ca, cert, key = (open(p, "rb").read() for p in args.tls.split(","))
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        opts.append(("grpc.ssl_target_name_override", args.server_name))
        ch = grpc.secure_channel(args.target, creds, options=opts)
    else:
        ch = grpc.insecure_channel(args.target, options=opts)
    out = {}
    if args.mode == "check":
        body, call = call_unary(ch, b"hello remora")
        out["unary_body"] = body.decode()
        out["unary_backend"] = dict(call.initial_metadata()).get("backend")
        out["unary_trailer"] = dict(call.trailing_metadata()).get("backend-trailer")
        stream = ch.unary_stream("/remora.test.Echo/Stream")
        out["stream"] = [m.decode() for m in stream(b"5", timeout=10)]
        try:
            ch.unary_unary("/remora.test.Echo/Fail")(b"5:no such thing", timeout=10)
            out["fail_code"] = "OK"
        except grpc.RpcError as e:
            out["fail_code"] = e.code().name
            out["fail_details"] = e.details()
            out["fail_trailer"] = dict(e.trailing_metadata() or ()).get("x-fail-detail")
    elif args.mode == "features":
        out = features(ch, args.big_mb * 1024 * 1024)
    elif args.mode == "unary":
        backends = collections.Counter()
        codes = collections.Counter()
        details = []
        for i in range(args.n):
            try:
                _, call = call_unary(ch, b"x%d" % i)
                backends[dict(call.initial_metadata()).get("backend")] += 1
                codes["OK"] += 1
            except grpc.RpcError as e:
                codes[e.code().name] += 1
                details.append(e.details())
        out = {"backends": backends, "codes": codes, "details": details[:3]}
    elif args.mode == "idle":
        import os

        ok, errors = 0, []
        for i in range(args.n):
            time.sleep(args.c / 1000.0)
            payload = os.urandom(1024 * 1024)
            big = os.urandom(3000).hex()
            try:
                body, call = ch.unary_unary("/remora.test.Echo/Unary").with_call(
                    payload, metadata=(("x-big", big),), timeout=20
                )
                digest = dict(call.trailing_metadata() or ()).get("x-big-sha256")
                if body != payload:
                    errors.append(f"call {i}: the 1 MiB message changed")
                elif digest != hashlib.sha256(big.encode()).hexdigest():
                    errors.append(f"call {i}: the metadata changed (digest {digest})")
                else:
                    ok += 1
            except grpc.RpcError as e:
                errors.append(f"call {i}: {e.code().name} {e.details()}")
        out = {"ok": ok, "errors": errors}
    elif args.mode == "stream":
        # A long server stream: N messages, C milliseconds apart.
        stream = ch.unary_stream("/remora.test.Echo/Stream")
        got = [m.decode() for m in stream(f"{args.n}:{args.c}".encode(), timeout=60)]
        out = {"messages": got}
    elif args.mode == "concurrent":
        import threading

        backends = collections.Counter()
        codes = collections.Counter()
        details = []
        latencies = []
        lock = threading.Lock()
        method = ch.unary_unary("/remora.test.Echo/" + args.method)
        remaining = [args.n]

        def worker():
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                start = time.monotonic()
                try:
                    _, call = method.with_call(args.payload.encode() or b"x", timeout=30)
                    b = dict(call.initial_metadata()).get("backend")
                    with lock:
                        backends[b] += 1
                        codes["OK"] += 1
                        latencies.append(time.monotonic() - start)
                except grpc.RpcError as e:
                    with lock:
                        codes[e.code().name] += 1
                        details.append(e.details())

        threads = [threading.Thread(target=worker) for _ in range(args.c)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        latencies.sort()
        pct = lambda p: latencies[min(len(latencies) - 1, int(len(latencies) * p))] if latencies else 0
        out = {"backends": backends, "codes": codes, "details": details[:3],
               "p50_ms": pct(0.5) * 1000, "p99_ms": pct(0.99) * 1000}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
