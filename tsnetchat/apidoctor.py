"""`tsnetchat doctor --api`: what Tailscale's API says about this server's node.

The server's device (found by its tailnet addresses) must be authorised; its key should not
expire soon (or expiry be off, as for tagged devices); it should be tagged (an untagged
server belongs to a person, and leaves with them); and the policy decides who may reach the
chat port at all, which the API's preview answers. One line each, like the other checks.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from .config import ServerConfig
from .doctor import FAIL, OK, SKIP, WARN, Check
from .errors import ConfigError, TailscaleAPIError
from .grants import find
from .tailnet import Status
from .tsapi import Device, open_api

EXPIRY_WARNING = timedelta(days=14)


def _expiry(d: Device, now: datetime) -> Check:
    if d.key_expiry_disabled:
        return Check("API: key expiry", OK, "key expiry is disabled for this device")
    if d.expires is None or d.expires.year <= 1:
        return Check("API: key expiry", OK, "the key does not expire")
    left = d.expires - now
    when = d.expires.strftime("%Y-%m-%d %H:%M UTC")
    if left <= timedelta(0):
        return Check("API: key expiry", FAIL, f"the node key expired {when}: the server is off "
                     "the tailnet until it logs in again (tailscale up --force-reauth), then "
                     "disable key expiry for it in the admin console")
    if left < EXPIRY_WARNING:
        return Check("API: key expiry", WARN, f"the node key expires {when} (in {left.days} "
                     "days): disable key expiry for this device in the admin console, or "
                     "tag it")
    return Check("API: key expiry", OK, f"the node key expires {when}")


async def api_checks(cfg: ServerConfig, st: Status | None,
                     now: datetime | None = None) -> list[Check]:
    names = ("API: device authorised", "API: key expiry", "API: tags", "API: who may connect")
    if st is None or not st.ips:
        return [Check(n, SKIP, "needs this node on the tailnet") for n in names]
    try:
        api = open_api(cfg)
    except ConfigError as e:
        return [Check("Tailscale API", FAIL, str(e))]
    out: list[Check] = []
    try:
        async with api:
            me = next((d for d in await api.devices() if set(d.addresses) & set(st.ips)), None)
            if me is None:
                return [Check("API: device authorised", FAIL, f"no device of this tailnet has "
                              f"the addresses {', '.join(st.ips)}: are the credentials for "
                              "this node's tailnet (tailnet setting)?")]
            if me.authorized is False:
                out.append(Check(names[0], FAIL, f"{me.name} is not authorised: approve it in "
                                 "the admin console (Machines), or join with a pre-authorised "
                                 "key (tsnetchat provision)"))
            else:
                out.append(Check(names[0], OK, f"{me.name} (id {me.id}) is authorised"))
            out.append(_expiry(me, now or datetime.now(UTC)))
            if me.tags:
                out.append(Check(names[2], OK, f"tagged {', '.join(me.tags)}"))
            else:
                owner = me.user or "a person"
                out.append(Check(names[2], WARN, f"untagged: the server belongs to {owner} and "
                                 "goes if they leave the tailnet; join it with a tagged key "
                                 "(tsnetchat provision)"))
            policy = await api.policy()
            ip = next((a for a in st.ips if ":" not in a), st.ips[0])
            reach = await api.reach(policy.text, ip, cfg.port)
    except TailscaleAPIError as e:
        return [*out, Check("Tailscale API", FAIL, str(e))]
    users = sorted({u for r in reach for u in r.users})
    grants = find(policy.text, cfg.cap_name)
    where = f"{ip}:{cfg.port}"
    if not users:
        out.append(Check(names[3], FAIL, f"the policy lets nobody reach {where}: add a grant "
                         "(or ACL) whose dst is this server"))
    else:
        out.append(Check(names[3], OK, f"the policy lets {', '.join(users)} reach {where}; "
                         f"{len(grants)} tsnetchat grant(s) (tsnetchat grants show)"))
    return out
