#!/usr/bin/env bash
# Set up this checkout on a fresh Debian/Ubuntu controller: system packages (when root) and .venv.
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Controller packages: the lab (debootstrap, systemd-nspawn, network namespaces, apt proxy),
# SSH, ruby to check the Vagrantfile, and ufw (left disabled here: tests/lab/test_ufw.py runs it in a
# private namespace to check r1fleet's ufw rules against the real thing), zstd (packs the stand-in Ollama release),
# haproxy (tests/unit/test_gateway.py runs the gateway's rendered configuration with the distribution's HAProxy).
APT_PACKAGES=(debootstrap systemd-container iproute2 apt-cacher-ng openssh-client curl ca-certificates
              nftables ruby python3-venv ufw zstd haproxy)

if [ "$(id -u)" = 0 ]; then
  missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    # apt-cacher-ng must not start as a system service: the lab runs its own instance.
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
else
  echo "setup: not root; skipping system packages (the lab needs root)" >&2
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,docs]'
echo "setup: ready (.venv/bin/r1fleet, .venv/bin/pyinfra, .venv/bin/pytest)"
