#!/usr/bin/env bash
# Install Debian packages without questions, as root: `scripts/apt-install.sh [apt-get option...] PKG...`.
# First finishes any dpkg run that was cut off (a killed install leaves a journal that makes every
# later apt-get refuse with "dpkg was interrupted"; the fix it asks for is `dpkg --configure -a`).
# apt-get waits up to five minutes for another apt or dpkg to let go of its lock. The package lists
# are fetched when there are none, and again when the install fails on stale ones.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
lock_wait=(-o DPkg::Lock::Timeout=300)
dpkg --force-confdef --force-confold --configure -a ||
  echo "apt-install.sh: dpkg --configure -a failed (above); trying the install anyway" >&2
if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
  apt-get update -qq "${lock_wait[@]}"
fi
apt-get install -y -qq "${lock_wait[@]}" "$@" 2>/dev/null ||
  { apt-get update -qq "${lock_wait[@]}" && apt-get install -y -qq "${lock_wait[@]}" "$@"; }
