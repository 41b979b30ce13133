"""Time `r1fleet status --fleet lab` over the lab's hosts, as a user runs it. Root, lab up and deployed.

    flock /tmp/r1fleet-lab.lock python bench/status.py [--runs 5]

Each run is the whole command (Python's start, the fleet and lock read, one SSH round trip per host in parallel,
the plans, the table); it prints the median and the fastest of `--runs`, and each host's state from the last run
(issue 22 target: under 3 s for the four hosts).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.monotonic()
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return time.monotonic() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    argv = [sys.executable, "-m", "r1fleet", "status", "--fleet", "lab", "--json"]
    times, result = [], None
    for _ in range(args.runs):
        elapsed, result = timed(argv)
        if result.returncode not in (0, 1):
            sys.exit(f"r1fleet status failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
        times.append(elapsed)
    hosts = json.loads(result.stdout)["hosts"]
    print(f"r1fleet status --fleet lab: {statistics.median(times):.2f} s median, {min(times):.2f} s fastest "
          f"({args.runs} runs, {len(hosts)} hosts; target < 3 s)")
    for host in hosts:
        print(f"  {host['host']}: {host['state']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
