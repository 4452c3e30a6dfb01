"""A tiny TCP forwarder: python tcpfwd.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT.

Used to let a tailscaled inside a test network namespace reach the lab's headscale (which
listens on the host's loopback) at the same address it has on the host."""

import asyncio
import sys

from tsnetchat.netio import splice


async def main() -> None:
    lh, lp, th, tp = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            upstream = await asyncio.open_connection(th, tp)
        except OSError:
            w.close()
            return
        await splice((r, w), upstream)

    server = await asyncio.start_server(handle, lh, lp)
    print("ready", flush=True)
    await server.serve_forever()


asyncio.run(main())
