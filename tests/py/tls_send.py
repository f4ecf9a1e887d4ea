"""Opens one TLS 1.3 connection with a client certificate and no ALPN (no server name either,
as a peer proxy does), sends bytes, and prints what came back until the server closed.

  tls_send.py HOST PORT CA CERT KEY PAYLOAD_HEX [EXPECT_BYTES]
(stops reading at the close, a whole HTTP response with content-length, or EXPECT_BYTES) and prints {"ok": true, "reply": "<text>"} or {"ok": false, "error": ...}
Env: TLS_SEND_ALPN offers that ALPN id; TLS_SEND_DELAY_MS waits that long after the handshake
before sending (a client that lets the server speak first).
"""
import json
import os
import socket
import ssl
import sys
import time

host, port, ca, cert, key, payload = sys.argv[1:7]
expect = int(sys.argv[7]) if len(sys.argv) > 7 else None
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
ctx.check_hostname = False
if os.environ.get("TLS_SEND_ALPN"):
    ctx.set_alpn_protocols([os.environ["TLS_SEND_ALPN"]])
delay = int(os.environ.get("TLS_SEND_DELAY_MS", "0")) / 1000
try:
    with socket.create_connection((host, int(port)), timeout=20) as raw:
        with ctx.wrap_socket(raw) as s:
            if delay:
                time.sleep(delay)
            s.sendall(bytes.fromhex(payload))
            got = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except (ssl.SSLError, ConnectionResetError):
                    break
                if not chunk:
                    break
                got += chunk
                if expect is not None and len(got) >= expect:
                    raise StopIteration
                if b"\r\n\r\n" in got and b"content-length" in got.lower():
                    head, _, rest = got.partition(b"\r\n\r\n")
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            if len(rest) >= int(line.split(b":")[1]):
                                raise StopIteration
    print(json.dumps({"ok": True, "reply": got.decode("utf-8", "replace")}))
except StopIteration:
    print(json.dumps({"ok": True, "reply": got.decode("utf-8", "replace")}))
except Exception as e:  # noqa: BLE001 - report any failure to the test
    print(json.dumps({"ok": False, "error": str(e)}))
