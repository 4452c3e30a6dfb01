"""`tsnetchat serve`: the embedded tailscaled (if asked) around the server lifecycle."""

from __future__ import annotations

from collections.abc import Callable

from .config import ServerConfig
from .server import serve


async def run_daemon(cfg: ServerConfig, reload_config: Callable[[], ServerConfig]) -> int:
    if not cfg.embedded:
        return await serve(cfg, reload_config=reload_config)
    from .embedded import EmbeddedTailscaled

    node = EmbeddedTailscaled(cfg)
    return await serve(cfg, reload_config=reload_config, before_start=node.start,
                       after_stop=node.stop)
