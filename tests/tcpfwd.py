"""A tiny TCP forwarder: python tcpfwd.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT.

Used to let a tailscaled inside a test network namespace reach the lab's headscale (which
listens on the host's loopback) at the same address it has on the host."""

import asyncio
import sys


async def main() -> None:
    lh, lp, th, tp = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection(th, tp)
        except OSError:
            w.close()
            return

        async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            try:
                while data := await a.read(65536):
                    b.write(data)
                    await b.drain()
            except Exception:
                pass
            b.close()

        await asyncio.gather(pipe(r, uw), pipe(ur, w))

    server = await asyncio.start_server(handle, lh, lp)
    print("ready", flush=True)
    await server.serve_forever()


asyncio.run(main())
