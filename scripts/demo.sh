#!/usr/bin/env bash
# The demo: a simulated home lab of four hosts on this machine, planned, deployed and verified.
# Needs root (network namespaces, systemd-nspawn). `r1fleet lab down` removes it all afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
step() { printf '\n==> %s\n' "$*"; }
step "r1fleet lab up"
r1fleet lab up
step "r1fleet plan --fleet lab   (each host planned from its own simulated GPUs)"
r1fleet plan --fleet lab || true
step "R1FLEET_FLEET=lab pyinfra -y inventory.py deploy.py   (rehearsal: a small stand-in model in the planned slot)"
R1FLEET_FLEET=lab pyinfra -y inventory.py deploy.py
step "r1fleet verify --fleet lab"
r1fleet verify --fleet lab
step "done: the lab stays up; try 'r1fleet lab ssh lab-dual3090', then 'r1fleet lab down'"
