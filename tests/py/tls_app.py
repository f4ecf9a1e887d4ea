"""An app that terminates its own TLS (HTTPS), for testing that the proxy passes it through.

  tls_app.py CERT KEY     serves GET with body "app tls ok"; prints PORT <n>; exits when stdin closes
"""
import http.server
import ssl
import sys
import threading


class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"app tls ok"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(f"PORT {srv.server_address[1]}", flush=True)
threading.Thread(target=srv.serve_forever, daemon=True).start()
sys.stdin.read()
