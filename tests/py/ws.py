"""WebSocket echo server and client (the `websockets` library) for remora's end-to-end tests.

  ws.py server                 echoes every message; prints `PORT <n>`; exits when stdin closes
  ws.py client PROXY URI N     connects to PROXY (host:port) while asking for URI (its host is
                               the authority the proxy routes by), sends N messages, checks the
                               echoes, prints JSON
"""
import asyncio
import json
import socket
import sys

import websockets
from websockets.sync.client import connect


async def serve():
    async def echo(ws):
        async for msg in ws:
            await ws.send(msg)

    async with websockets.serve(echo, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"PORT {port}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def client(proxy, uri, n):
    host, port = proxy.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    echoed = 0
    with connect(uri, sock=sock, open_timeout=10) as ws:
        for i in range(n):
            msg = f"message {i} " + "x" * (i * 100)
            ws.send(msg)
            if ws.recv(timeout=10) == msg:
                echoed += 1
        ws.send(b"\x00\x01binary")
        binary_ok = ws.recv(timeout=10) == b"\x00\x01binary"
    print(json.dumps({"sent": n, "echoed": echoed, "binary": binary_ok}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        asyncio.run(serve())
    else:
        client(sys.argv[2], sys.argv[3], int(sys.argv[4]))
