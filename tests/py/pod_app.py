"""An unmodified "pod" app for the interception tests, bound to loopback like a sidecar'd app:
  127.0.0.1:8080  HTTP/1.1 (keep-alive): body `NAME <x-remora-client-id or ->`
  127.0.0.1:9000  TCP echo (client speaks first)
  127.0.0.1:3306  server speaks first: sends `HELLO NAME\n`, then echoes
  --any: bind 0.0.0.0 instead (a server outside the mesh, reached without a proxy)
Prints `READY` once every port listens; ends when stdin closes.
"""
import argparse
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--any", action="store_true")
    args = ap.parse_args()
    host = "0.0.0.0" if args.any else "127.0.0.1"
    name = args.name

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = f"{name} {self.headers.get('x-remora-client-id', '-')}\n".encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    http = ThreadingHTTPServer((host, 8080), H)
    http.daemon_threads = True
    threading.Thread(target=http.serve_forever, daemon=True).start()

    def tcp(port, banner):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(64)

        def serve(c):
            with c:
                if banner:
                    c.sendall(f"HELLO {name}\n".encode())
                while True:
                    d = c.recv(65536)
                    if not d:
                        return
                    c.sendall(d)

        def accept():
            while True:
                c, _ = s.accept()
                threading.Thread(target=serve, args=(c,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    tcp(9000, False)
    tcp(3306, True)
    print("READY", flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
