"""An HTTP/1.1 app on a Unix domain socket: answers every request with
`unix-app <x-remora-client-id>`; prints `PORT 0` once it serves. Exits when stdin closes."""
import http.server
import os
import socketserver
import sys
import threading


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = f"unix-app {self.headers.get('x-remora-client-id', '-')}\n".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    # A Unix socket peer has no address to log.
    def address_string(self):
        return "unix"

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def main():
    path = sys.argv[1]
    if os.path.exists(path):
        os.unlink(path)
    srv = Server(path, Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    # The line python_server() waits for (a Unix socket has no port).
    print("PORT 0", flush=True)
    sys.stdin.read()
    srv.shutdown()


if __name__ == "__main__":
    main()
