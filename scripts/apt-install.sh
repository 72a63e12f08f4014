#!/usr/bin/env bash
# Install Debian packages without questions, as root: `scripts/apt-install.sh [apt-get option...] PKG...`.
# Finishes any dpkg run that was cut off first (a killed install leaves a journal that makes every
# later apt-get refuse with "dpkg was interrupted"), waits up to five minutes for another apt or
# dpkg to let go of its lock, and refreshes the package lists only when the install needs them.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
lock_wait=(-o DPkg::Lock::Timeout=300)
dpkg --force-confdef --force-confold --configure -a ||
  echo "apt-install.sh: dpkg --configure -a failed (above); trying the install anyway" >&2
apt-get install -y -qq "${lock_wait[@]}" "$@" ||
  { apt-get update -qq "${lock_wait[@]}" && apt-get install -y -qq "${lock_wait[@]}" "$@"; }
