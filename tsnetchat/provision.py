"""Provisioning a server node through Tailscale's API: a minted auth key instead of one
pasted in, and the stale device that still holds the server's name.

``mint_key`` asks the API for a single-use, pre-authorised auth key carrying the config's
``tags`` (keys an OAuth client mints must carry tags). ``clear_name`` looks for devices that
already hold the MagicDNS name a fresh node is about to ask for (the server's old node, after
its state dir was lost): with ``stale_device = "remove"`` it removes one that is offline and
carries exactly our tags, i.e. was made the same way; anything else it only reports, since
the new node would otherwise come up as ``<name>-1``. ``serve --embedded`` runs both on a
fresh state dir; ``tsnetchat provision`` runs them for any node (the system tailscaled's
``tailscale up --auth-key``, or the embedded unit's credential file).
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .config import ServerConfig
from .errors import ConfigError
from .tsapi import Device, TailscaleAPI, credentials, open_api

log = logging.getLogger("tsnetchat.provision")

KEY_TTL_SECONDS = 600  # the key only has to last until `tailscale up` presents it


# What may stand in a file `provision --out` writes over: nothing, or one word that is no
# other kind of Tailscale secret (an auth key provisioned before).
_NOT_A_KEY = {b"tskey-client-": "an OAuth client's secret (tskey-client-...)",
              b"tskey-api-": "an API access token (tskey-api-...)"}


def open_out(out: Path) -> tuple[int, bool]:
    """The file `provision --out` writes the key to, opened before the API is asked (a key
    minted for an --out that could not be written was lost, after a stale device may have
    been removed for it): (its descriptor, whether this made it). Raises ConfigError, and
    nothing is minted, unless ``out`` is absent, empty or a key file to replace: an OAuth
    client's secret in the embedded unit's /etc/tsnetchat/authkey (README, Operations),
    or the config file beside it, was replaced by the key and lost (an operator's run,
    2026-11-25)."""
    made = not os.path.lexists(out)
    try:
        fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ConfigError(f"--out {out}: {e.strerror}; no key was minted") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"--out {out} is not a regular file; no key was minted: give "
                              "the key file's name")
        held = os.pread(fd, 4096, 0).strip()
        what = next((w for p, w in _NOT_A_KEY.items() if held.startswith(p)), None)
        if what is None and len(held.split()) > 1:
            what = "more than one word, which no auth key is"
        if what is not None:
            raise ConfigError(f"--out {out} holds {what}, so it is not replaced; no key was "
                              "minted: give a new file name, or a key file to replace")
    except BaseException:
        os.close(fd)
        raise
    return fd, made


@dataclass(frozen=True)
class NameHolder:
    """A device that held the name a fresh node asks for, and whether it was removed."""

    device: Device
    removed: bool
    stale_device: str  # the setting it was handled under: remove or report

    def message(self, hostname: str) -> str:
        d = self.device
        seen = d.last_seen.strftime("%Y-%m-%d %H:%M UTC") if d.last_seen else "never"
        state = {True: "online", False: "offline", None: "state unknown"}[d.connected]
        if self.removed:
            return (f"removed the stale device {d.name} (id {d.id}, {state}, last seen {seen}) "
                    f"that still held the name {hostname}")
        why = ("stale_device is report" if self.stale_device == "report" else
               "it is online" if d.connected else
               "its state is unknown" if d.connected is None else
               "its tags differ from this node's")
        return (f"the device {d.name} (id {d.id}, {state}, last seen {seen}, tags "
                f"{','.join(d.tags) or 'none'}) still holds the name {hostname}, so this node "
                f"gets another name ({hostname}-1 or similar) until it is removed; not removed "
                f"because {why}: remove it in the admin console (Machines)")


def _removable(d: Device, tags: list[str]) -> bool:
    return d.connected is False and bool(tags) and sorted(d.tags) == sorted(tags)


async def clear_name(cfg: ServerConfig, api: TailscaleAPI, hostname: str) -> list[NameHolder]:
    """Remove (or report) the devices that hold ``hostname``'s name, for a node that has not
    joined yet. Returns what it found; the caller logs or prints the messages."""
    out = []
    for d in await api.devices():
        if d.short_name != hostname:
            continue
        remove = cfg.stale_device == "remove" and _removable(d, cfg.tag_list)
        if remove:
            await api.delete_device(d.id)
        out.append(NameHolder(d, remove, cfg.stale_device))
    return out


async def mint_key(cfg: ServerConfig, api: TailscaleAPI, hostname: str, *,
                   ephemeral: bool = False) -> str:
    tags = cfg.tag_list
    if api.creds.oauth and not tags:
        raise ConfigError("an OAuth client can only mint tagged auth keys: set tags (e.g. "
                          'tags = "tag:chat"), and make the OAuth client own that tag')
    return await api.mint_auth_key(tags=tags, description=f"tsnetchat {hostname}"[:50],
                                   expiry_seconds=KEY_TTL_SECONDS, ephemeral=ephemeral)


def say_holders(holders: list[NameHolder], hostname: str) -> None:
    """Log what held ``hostname``'s name: removed (info), or left in place (a warning)."""
    for h in holders:
        (log.info if h.removed else log.warning)("%s", h.message(hostname))


def api_configured(cfg: ServerConfig) -> bool:
    """Whether the config gives API credentials (ConfigError if it gives half of some)."""
    return credentials(cfg).given


async def provision(cfg: ServerConfig, hostname: str, *, fresh: bool = True, mint: bool = True,
                    ephemeral: bool = False) -> tuple[str, list[NameHolder]]:
    """For a node about to join as ``hostname``: clear the name (if the node is ``fresh``)
    and mint its key (if ``mint``; else the key is ""). Returns (key, what held the name):
    the caller says what held it, in its own way (``say_holders`` for a log). (Logged here
    too, `tsnetchat provision` said each twice: its own line, and the warning Python's
    logging prints without a handler; an operator's run, 2026-11-25.)"""
    async with open_api(cfg) as api:
        holders = await clear_name(cfg, api, hostname) if fresh else []
        key = await mint_key(cfg, api, hostname, ephemeral=ephemeral) if mint else ""
    if mint:
        log.info("minted a single-use, pre-authorised auth key for %s (tags %s, valid %d s)",
                 hostname, ",".join(cfg.tag_list) or "none", KEY_TTL_SECONDS)
    return key, holders
