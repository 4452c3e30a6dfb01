"""Tailscale's API, through the `tailscale` package: the one place tsnetchat talks to it.

Everything here is optional: it needs the package (``pip install 'tsnetchat[api]'``) and
credentials, an API access token (``api_key``) or an OAuth client (``oauth_client_id`` +
``oauth_client_secret``; the secret may also sit in the ``authkey`` credential or file,
recognised by its ``tskey-client-`` prefix). Without them nothing here runs.

The package's errors are translated here, and only here, into TailscaleAPIError (or
PolicyConflict for a policy file saved by someone else meanwhile), raised ``from`` the
original; its models are copied into small frozen types of our own.

``api_url`` says where api.tailscale.com is reached. The package always asks for
``https://api.tailscale.com/api/v2/...``; when ``api_url`` names another host:port (the
tests' stand-in), connections go there instead while TLS still checks the certificate
against api.tailscale.com (trusted through the usual SSL_CERT_FILE).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from .config import DEFAULT_API_URL, ServerConfig
from .errors import ConfigError, PolicyConflict, TailscaleAPIError

CLIENT_SECRET_PREFIX = "tskey-client-"
API_HOST = "api.tailscale.com"
T = TypeVar("T")


@dataclass(frozen=True)
class Credentials:
    api_key: str = ""
    oauth_client_id: str = ""
    oauth_client_secret: str = ""

    @property
    def given(self) -> bool:
        return bool(self.api_key or (self.oauth_client_id and self.oauth_client_secret))

    @property
    def oauth(self) -> bool:
        return bool(self.oauth_client_id and self.oauth_client_secret)


def credentials(cfg: ServerConfig) -> Credentials:
    """The API credentials the config gives, if any. An OAuth client secret may also come
    where an auth key would (the ``authkey`` credential, ``auth_key_file``)."""
    secret = cfg.oauth_client_secret.strip()
    if not secret and cfg.oauth_client_id:
        from .embedded import find_auth_key

        key = find_auth_key(cfg)
        if key.startswith(CLIENT_SECRET_PREFIX):
            secret = key
    if cfg.oauth_client_id and not secret:
        raise ConfigError("oauth_client_id is set but no OAuth client secret was given: set "
                          "oauth_client_secret (TSNETCHAT_OAUTH_CLIENT_SECRET) or put the "
                          "tskey-client-... secret where the auth key goes")
    if secret and not cfg.oauth_client_id:
        raise ConfigError("an OAuth client secret needs its client id: set oauth_client_id")
    return Credentials(cfg.api_key.strip(), cfg.oauth_client_id.strip(), secret)


@dataclass(frozen=True)
class Device:
    """A device as the API reports it (the fields tsnetchat uses)."""

    id: str
    node_id: str
    name: str  # the MagicDNS name, chat-server.tailnet.ts.net
    hostname: str
    addresses: tuple[str, ...]
    tags: tuple[str, ...]
    user: str
    authorized: bool | None
    expires: datetime | None
    key_expiry_disabled: bool | None
    last_seen: datetime | None
    connected: bool | None

    @property
    def short_name(self) -> str:
        return self.name.split(".")[0]


@dataclass(frozen=True)
class Policy:
    """The tailnet policy file as HuJSON text, with the ETag that saving it must present."""

    text: str
    etag: str | None


@dataclass(frozen=True)
class Reach:
    """One rule of a policy that lets ``users`` reach ``ports`` (a preview match)."""

    users: tuple[str, ...]
    ports: tuple[str, ...]
    line: int | None


class TailscaleAPI:
    """A session with Tailscale's API. ``async with open_api(cfg) as api: ...``."""

    def __init__(self, cfg: ServerConfig, creds: Credentials) -> None:
        self.cfg = cfg
        self.creds = creds
        self._client: Any = None

    async def __aenter__(self) -> TailscaleAPI:
        from tailscale import Tailscale

        oauth = self.creds.oauth  # an OAuth client wins when both are given
        self._client = Tailscale(
            tailnet=self.cfg.tailnet, api_key=None if oauth else self.creds.api_key,
            oauth_client_id=self.creds.oauth_client_id if oauth else None,
            oauth_client_secret=self.creds.oauth_client_secret if oauth else None,
            session=_session(self.cfg.api_url))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            session = self._client.session
            await self._client.close()
            if session is not None:
                await session.close()
            self._client = None

    @property
    def _which_credentials(self) -> str:
        return "oauth_client_id and its secret" if self.creds.oauth else "api_key"

    async def _call(self, what: str, scope: str, call: Awaitable[T]) -> T:
        """Await one call of the package; its errors become ours, naming ``what`` failed."""
        import tailscale as ts

        try:
            return await call
        except ts.TailscaleUnauthorizedError as e:
            raise TailscaleAPIError(
                f"{what}: Tailscale's API did not accept the credentials ({e.status}: "
                f"{e.reason}); check {self._which_credentials}") from e
        except ts.TailscalePermissionError as e:
            raise TailscaleAPIError(
                f"{what}: Tailscale's API refused it ({e.status}: {e.reason}); the credentials "
                f"need the {scope} scope") from e
        except ts.TailscaleResponseError as e:
            if e.status == 412:
                raise PolicyConflict(
                    f"{what}: the tailnet policy file changed since it was read (someone else "
                    "saved it); nothing was saved, run the command again") from e
            raise TailscaleAPIError(f"{what}: Tailscale's API answered {e.status}: "
                                    f"{e.reason}") from e
        except ts.TailscaleConnectionError as e:
            cause = e.__cause__ or e
            raise TailscaleAPIError(f"{what}: cannot reach Tailscale's API at "
                                    f"{self.cfg.api_url}: {cause}") from e
        except ts.TailscaleError as e:  # the OAuth token exchange, mostly
            raise TailscaleAPIError(f"{what}: {e}; check {self._which_credentials}") from e
        except ValueError as e:  # an id that is no path segment, a reply that is no model
            raise TailscaleAPIError(f"{what}: {e}") from e

    # calls -------------------------------------------------------------------------

    async def mint_auth_key(self, *, tags: list[str], description: str,
                            expiry_seconds: int = 600, ephemeral: bool = False) -> str:
        """A new single-use, pre-authorised auth key whose devices carry ``tags``."""
        key = await self._call("minting an auth key", "auth_keys", self._client.create_key(
            key_type="auth", description=description, expiry_seconds=expiry_seconds,
            reusable=False, ephemeral=ephemeral, preauthorized=True, tags=tags))
        if not key.key:
            raise TailscaleAPIError("minting an auth key: the API returned no key")
        return str(key.key)

    async def devices(self) -> list[Device]:
        found = await self._call("listing devices", "devices:core", self._client.devices())
        return [_device(d) for d in found.values()]

    async def delete_device(self, device_id: str) -> None:
        await self._call(f"removing device {device_id}", "devices:core",
                         self._client.delete_device(device_id))

    async def policy(self) -> Policy:
        p = await self._call("reading the policy file", "policy_file",
                             self._client.policy_file())
        return Policy(p.policy, p.etag)

    async def validate_policy(self, text: str) -> str:
        """"" if the API accepts ``text`` as the policy file (its tests pass), else why not."""
        import tailscale as ts

        try:
            v = await self._call("validating the policy file", "policy_file",
                                 self._client.validate_policy_file(text))
        except TailscaleAPIError as e:
            if isinstance(e.__cause__, ts.TailscaleResponseError) and e.__cause__.status == 400:
                return e.__cause__.reason
            raise
        if v.valid:
            return ""
        details = "; ".join(f"{r.user}: {', '.join(r.errors)}" for r in v.data if r.errors)
        return f"{v.message}{': ' + details if details else ''}"

    async def save_policy(self, text: str, etag: str | None) -> Policy:
        """Save the policy file only if it is still the version ``etag`` names (If-Match);
        PolicyConflict otherwise."""
        if not etag:
            raise TailscaleAPIError("saving the policy file: the API gave no ETag when it was "
                                    "read, so a concurrent edit could not be detected; not "
                                    "saving")
        p = await self._call("saving the policy file", "policy_file",
                             self._client.set_policy_file(text, etag=etag))
        return Policy(p.policy, p.etag)

    async def reach(self, policy_text: str, ip: str, port: int) -> list[Reach]:
        """Which rules of ``policy_text`` let whom reach ``ip:port``."""
        target = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        preview = await self._call(
            f"previewing who may reach {target}", "policy_file",
            self._client.preview_policy_rules(policy_text, preview_type="ipport",
                                              preview_for=target))
        return [Reach(tuple(m.users), tuple(m.ports), m.line_number) for m in preview.matches]


def _device(d: Any) -> Device:
    return Device(id=d.device_id, node_id=d.node_id, name=d.name.rstrip("."),
                  hostname=d.hostname, addresses=tuple(d.addresses), tags=tuple(d.tags),
                  user=d.user or "", authorized=d.authorized, expires=d.expires,
                  key_expiry_disabled=d.key_expiry_disabled, last_seen=d.last_seen,
                  connected=d.connected_to_control)


def _session(api_url: str) -> Any:
    """An aiohttp session for the package. The default URL honours HTTPS_PROXY; another
    ``api_url`` gets the package's connections to api.tailscale.com sent to its host:port."""
    import aiohttp
    from aiohttp.abc import AbstractResolver, ResolveResult
    from aiohttp.resolver import DefaultResolver
    from yarl import URL

    ctx = ssl.create_default_context()
    if api_url.rstrip("/") == DEFAULT_API_URL:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx), trust_env=True)
    url = URL(api_url)
    host, port = url.host or "", url.port or 443

    class ConnectTo(AbstractResolver):
        async def resolve(self, hostname: str, port_: int = 0,
                          family: socket.AddressFamily = socket.AF_INET
                          ) -> list[ResolveResult]:
            try:
                addrs = [str(ipaddress.ip_address(host))]
            except ValueError:
                addrs = [i["host"] for i in await DefaultResolver().resolve(host, port, family)]
            return [ResolveResult(hostname=hostname, host=a, port=port,
                                  family=socket.AF_INET6 if ":" in a else socket.AF_INET,
                                  proto=0, flags=socket.AI_NUMERICHOST) for a in addrs]

        async def close(self) -> None:
            return None

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, resolver=ConnectTo()))


def open_api(cfg: ServerConfig) -> TailscaleAPI:
    """A session for the config's credentials; ConfigError without them or the package."""
    creds = credentials(cfg)
    if not creds.given:
        raise ConfigError("Tailscale's API needs credentials: an API access token (api_key, "
                          "TSNETCHAT_API_KEY) or an OAuth client (oauth_client_id and "
                          "oauth_client_secret)")
    try:
        import tailscale  # noqa: F401
    except ImportError:
        raise ConfigError("Tailscale's API needs the `tailscale` package: pip install "
                          "'tsnetchat[api]'") from None
    return TailscaleAPI(cfg, creds)
