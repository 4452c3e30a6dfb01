"""Every error tsnetchat raises on purpose, in one place.

::

    TsnetchatError
    ├── ConfigError              a setting is wrong; names the flag/key/variable at fault
    ├── TailnetError             something about tailscaled
    │   ├── LocalAPIUnavailable  the LocalAPI socket does not answer (absent, down, timeout),
    │   │                        so nobody's tailnet identity can be checked (fail closed)
    │   ├── TailnetNotReady      tailscaled answers but is not Running (logged out, stopped)
    │   ├── PeerNotFound         WhoIs/discovery found no such peer
    │   └── TailscaleAPIError    Tailscale's API refused or failed a call (tsapi.py)
    │       └── PolicyConflict   the policy file changed since it was read; nothing was saved
    ├── ServerUnavailable        the server's node answers but nothing serves tsnetchat there
    ├── Unauthenticated          one of the two locks (token, tailnet identity) failed
    ├── PermissionDenied         both locks passed but this action is not allowed
    ├── InvalidInput             a request is malformed (bad room name, bad text, garbage)
    ├── LimitExceeded            size, rate, rooms, queue or refusal limits
    ├── Unavailable              the server cannot take the call now (shutting down); retry
    └── StoreError               the history database failed, or is not one we can use
        ├── StateDirInUse        another tsnetchat process (a server, a restore) holds the
        │                        state dir's lock
        ├── StoreDamaged         the database file is damaged (SQLite: malformed, not a
        │                        database): only a restore mends it; sending again cannot
        └── Unconfirmed          cluster mode: the cluster did not confirm a message in time;
                                 it may still appear (a resend with its client_msg_id is safe)

Foreign errors (httpx, sqlite3, jwt, the `tailscale` package) are translated at one boundary
each, raised ``from`` the original (tailnet.py, store.py, auth.py, tsapi.py; nats-py in
cluster.py).
``tsnetchat.service.status_for`` maps these to gRPC status codes; only the servicer uses it.
"""

from __future__ import annotations

# What a closing server adds to its UNAVAILABLE for client code of its own; tsnetchat's
# clients resume by themselves and leave it out of what they show (clienterrors.from_status).
RESUME_HINT = "; reconnect and resume after your last message id"


class TsnetchatError(Exception):
    """Base of every deliberate tsnetchat error. ``str(e)`` is meant for people."""


class ConfigError(TsnetchatError):
    pass


class TailnetError(TsnetchatError):
    pass


class LocalAPIUnavailable(TailnetError):
    pass


class TailnetNotReady(TailnetError):
    pass


class PeerNotFound(TailnetError):
    pass


class ServerUnavailable(TsnetchatError):
    """The server's machine is reachable, but the server is not (not running, wrong port).
    Trying again later may help."""


class TailscaleAPIError(TailnetError):
    pass


class PolicyConflict(TailscaleAPIError):
    pass


class Unauthenticated(TsnetchatError):
    pass


class PermissionDenied(TsnetchatError):
    pass


class InvalidInput(TsnetchatError):
    pass


class LimitExceeded(TsnetchatError):
    pass


class Unavailable(TsnetchatError):
    pass


class StoreError(TsnetchatError):
    pass


class StateDirInUse(StoreError):
    pass


class StoreDamaged(StoreError):
    """The history database is damaged (SQLite says malformed, or not a database): nothing
    the client does helps, and the operator must restore the last backup."""


class Unconfirmed(StoreError):
    """Not confirmed within the wait, which is not "not stored": the message may still
    appear. Sending it again with the same client_msg_id never stores it twice."""
