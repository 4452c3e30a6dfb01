"""Byte plumbing shared by the LocalAPI-dial bridge (and the test stand-ins)."""

from __future__ import annotations

import asyncio
import contextlib


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    with contextlib.suppress(Exception):
        dst.close()


async def splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """Copy bytes both ways between two streams until both directions end; closes both."""
    await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))
