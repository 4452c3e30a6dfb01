"""tsnetchat: a private chat service that lives on a Tailscale tailnet."""

from .config import ServerConfig, load_config
from .errors import (
    ConfigError,
    InvalidInput,
    LimitExceeded,
    LocalAPIUnavailable,
    PeerNotFound,
    PermissionDenied,
    StoreError,
    TailnetError,
    TailnetNotReady,
    TsnetchatError,
    Unauthenticated,
    Unavailable,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "InvalidInput",
    "LimitExceeded",
    "LocalAPIUnavailable",
    "PeerNotFound",
    "PermissionDenied",
    "ServerConfig",
    "StoreError",
    "TailnetError",
    "TailnetNotReady",
    "TsnetchatError",
    "Unauthenticated",
    "Unavailable",
    "__version__",
    "load_config",
]
