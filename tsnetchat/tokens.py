"""Where the client finds its token: --token, --token-file, TSNETCHAT_TOKEN, or the
per-server store in the user's config dir (~/.config/tsnetchat/tokens.json, mode 0600)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .errors import ConfigError, Unauthenticated


def store_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "tsnetchat" / "tokens.json"


def _key(server: str) -> str:
    return server.strip().rstrip(".").lower()


def load_store(path: Path | None = None) -> dict[str, str]:
    path = path or store_path()
    if not path.exists():
        return {}
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"{path} holds tokens but others can read it (mode {mode:04o}); run "
                          f"`chmod 600 {path}`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def save_token(server: str, token: str, path: Path | None = None) -> Path:
    path = path or store_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = load_store(path)
    data[_key(server)] = token
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return path


def find_token(server: str, *, token: str | None = None, token_file: Path | None = None,
               path: Path | None = None) -> str:
    """The first of: explicit token, token file, TSNETCHAT_TOKEN, the saved token."""
    if token:
        return token.strip()
    if token_file is not None:
        try:
            return token_file.read_text().strip()
        except OSError as e:
            raise ConfigError(f"--token-file {token_file}: {e.strerror}") from None
    if os.environ.get("TSNETCHAT_TOKEN"):
        return os.environ["TSNETCHAT_TOKEN"].strip()
    saved = load_store(path).get(_key(server))
    if saved:
        return saved
    raise Unauthenticated(
        f"no token for {server}: pass --token or --token-file, set TSNETCHAT_TOKEN, or save one "
        f"with `tsnetchat connect {server} --token ... --save-token`. Ask the server's admin "
        "for a token (`tsnetchat token issue <your login>`).")
