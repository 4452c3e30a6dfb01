#!/usr/bin/env bash
# Debian packages the tests and demo use: tmux (terminal test), systemd (systemd-analyze),
# iproute2 (network namespaces for the TUN test), debootstrap and systemd-container (the
# Debian root and systemd-nspawn that boot a real systemd for the unit tests), openssl (the
# certificate of the Tailscale API stand-in). Installs only what is missing.
set -euo pipefail
need=()
command -v tmux >/dev/null || need+=(tmux)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v ip >/dev/null || need+=(iproute2)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v openssl >/dev/null || need+=(openssl)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "missing ${need[*]}: install them (tests that need them fail in CI, skip elsewhere)" >&2
  exit 0
fi
echo "installing ${need[*]} ..." >&2
export DEBIAN_FRONTEND=noninteractive
# Quiet unless it fails (dpkg chatters on stderr even when all is well).
out=$(apt-get -o DPkg::Lock::Timeout=300 update -qq 2>&1 &&
      apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${need[@]}" 2>&1) ||
  { echo "$out" >&2; exit 1; }
