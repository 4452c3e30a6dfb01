#!/usr/bin/env bash
# `after`: fail if the test run left any lab process behind (tailscaled, headscale, and the
# other test services: nats-server, systemd-nspawn, and a container's systemd as PID 1, which
# tests/nspawn.py gives this run's TSNETCHAT_RUN_ID). Only this run's processes count: the
# Makefile gives each run a TSNETCHAT_RUN_ID, which every child inherits, so labs of other
# runs on the same machine (a developer's `dev-tailnet up`, a parallel checkout) are ignored.
set -u
case "${1:-}" in
  before) exit 0 ;;
  after) ;;
  *) echo "usage: $0 before|after" >&2; exit 2 ;;
esac
id=${TSNETCHAT_RUN_ID:-}
[ -n "$id" ] || { echo "no-leftovers: TSNETCHAT_RUN_ID is not set" >&2; exit 2; }
left=()
for pid in $(pgrep -f '(tailscaled|headscale|nats-server|systemd-nspawn|/lib/systemd/systemd$)' || true); do
  [ "$pid" = "$$" ] && continue
  if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx "TSNETCHAT_RUN_ID=$id"; then
    left+=("$pid")
  fi
done
if [ ${#left[@]} -gt 0 ]; then
  echo "test run left processes behind:" >&2
  ps -o pid,args -p "$(IFS=,; echo "${left[*]}")" >&2
  exit 1
fi
echo "no leftover tailnet processes"
