#!/usr/bin/env bash
# `before`: remember lab processes already running (a developer's `dev-tailnet up`).
# `after`: fail if the test run left any new tailscaled/headscale behind.
set -u
f=${TMPDIR:-/tmp}/tsnetchat-leftovers.$(id -u)
list() { pgrep -f 'tsnetchat/tools/.*/(tailscaled|headscale)' | sort; }
case "${1:-}" in
  before) list > "$f" ;;
  after)
    new=$(comm -13 "$f" <(list))
    if [ -n "$new" ]; then
      echo "test run left processes behind:" >&2
      ps -o pid,args -p $(echo $new | tr ' ' ',') >&2
      exit 1
    fi
    echo "no leftover tailnet processes" ;;
esac
