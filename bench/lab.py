"""Time the lab: warm `lab up` (image cached) and, with --cold, a first build. Root only.

    python bench/lab.py [--cold] [--keep]

Prints seconds for each step; targets (issue 3): warm up of four hosts < 60 s, cold < 5 min.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from r1fleet.lab import image, state


def lab(*args: str) -> float:
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "r1fleet.lab", *args], capture_output=True, text=True)
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        sys.exit(f"r1fleet lab {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return elapsed


def reachable_hosts() -> int:
    hosts = [h["name"] for h in state.lab_hosts() if h["state"] == "up"]
    ok = 0
    for name in hosts:
        argv = ["ssh", "-F", str(state.ssh_config_path()), "-o", "BatchMode=yes", name, "true"]
        ok += subprocess.run(argv, capture_output=True).returncode == 0
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cold", action="store_true", help="also time a first build (removes the cached image)")
    parser.add_argument("--keep", action="store_true", help="leave the lab up at the end")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/lab.py: run as root (the lab needs namespaces and mounts)")
    print(f"lab down (start clean): {lab('down'):.1f} s")
    if args.cold:
        image.remove_all()
        print(f"cold lab up (debootstrap + boot): {lab('up'):.1f} s  [target < 300 s]")
        print(f"lab down: {lab('down'):.1f} s")
    warm = lab("up")
    print(f"warm lab up ({reachable_hosts()} hosts reachable over SSH): {warm:.1f} s  [target < 60 s]")
    if not args.keep:
        print(f"lab down: {lab('down'):.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
