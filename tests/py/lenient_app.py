"""A deliberately lenient HTTP app, as real ones are: Python's http.server, which accepts request
lines remora's detector refuses (a tab, a trailing space, HTTP/1.2, no version, non-ASCII). It
answers every GET with the peer identity header it received, so a test can see a forgery.

  lenient_app.py    prints PORT <n>, serves until stdin closes
"""
import http.server
import sys
import threading


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        body = ("path: %s\nclient-id: %s\n" % (
            self.path, self.headers.get("x-remora-client-id", "none"))).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print("PORT", server.server_address[1], flush=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
sys.stdin.read()
