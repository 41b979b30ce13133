"""A no-op rerun of the lab deploy against pyinfra's own floor on the same hosts. Root, lab up.

    python bench/noop_rerun.py [--runs 3]

Converges the lab once, then times, side by side and `--runs` times each:
  * the rerun: `pyinfra -y inventory.py deploy.py` on the converged lab (nothing to change);
  * the floor: `pyinfra -y inventory.py exec -- true`, pyinfra connecting to the same hosts with the same
    inventory and running one command.
Prints the medians, the SSH round trips the rerun makes per host, and their ratio (issue 12 target: the rerun
within 2.5x the floor).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYINFRA = [sys.executable, "-m", "pyinfra", "-y", "inventory.py"]
ENV = {**os.environ, "R1FLEET_FLEET": "lab"}


def timed(argv: list[str]) -> tuple[float, str]:
    start = time.monotonic()
    result = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1800)
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(argv[2:])} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return elapsed, result.stdout + result.stderr


def commands_per_host(output: str) -> float:
    """Facts and operations that reached the hosts: pyinfra -v prints one line per command it runs."""
    hosts = {line.split("]", 1)[0] for line in output.splitlines() if line.startswith("[lab-") and ">>>" in line}
    commands = sum(1 for line in output.splitlines() if line.startswith("[lab-") and ">>>" in line)
    return commands / len(hosts) if hosts else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    timed([*PYINFRA, "deploy.py"])  # converge first: what follows must change nothing
    reruns, floors = [], []
    for _ in range(args.runs):
        reruns.append(timed([*PYINFRA, "deploy.py"])[0])
        floors.append(timed([*PYINFRA, "exec", "--", "true"])[0])
    _, verbose = timed([*PYINFRA, "-vv", "deploy.py"])
    rerun, floor = statistics.median(reruns), statistics.median(floors)
    print(f"no-op rerun of the lab deploy: {rerun:.2f} s (median of {args.runs})")
    print(f"pyinfra connect + one command: {floor:.2f} s (median of {args.runs})")
    print(f"commands per host in a rerun:  {commands_per_host(verbose):.0f}")
    print(f"ratio: {rerun / floor:.2f}x (target <= 2.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
