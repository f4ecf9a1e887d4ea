"""An ASGI app under Hypercorn, which (like many real servers) accepts an HTTP/1.1
`Upgrade: h2c` and then speaks HTTP/2 on the same connection. It answers with the path and the
peer identity header it received.

  h2c_app.py    prints PORT <n>, serves until stdin closes
"""
import asyncio
import socket
import sys

from hypercorn.asyncio import serve
from hypercorn.config import Config


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    headers = dict((k.decode(), v.decode()) for k, v in scope["headers"])
    body = ("path: %s\nclient-id: %s\nversion: %s\n" % (
        scope["path"], headers.get("x-remora-client-id", "none"), scope["http_version"])).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def main():
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.set_inheritable(True)
    cfg = Config()
    cfg.bind = ["fd://%d" % sock.fileno()]
    cfg.accesslog = None
    cfg.errorlog = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.read(1) else None)
    task = asyncio.ensure_future(serve(app, cfg, shutdown_trigger=stop.wait))
    print("PORT", sock.getsockname()[1], flush=True)
    await task


asyncio.run(main())
