"""Bytes from upstream per fleet deploy, and a rebuild from the controller's cache against one from upstream.
Root, lab up (`r1fleet lab up`).

    python bench/rebuild.py [--hosts lab-cpu,lab-dual3090,lab-3060]

1. Every lab host reinstalled from the clean image, an empty controller cache, one deploy: the bytes the lab
   mirror (the lab's internet) served against the bytes of the distinct artifacts deployed.
2. The chosen hosts reinstalled again and deployed with that cache (R1FLEET_CACHE on): time and mirror bytes.
3. The same hosts reinstalled and deployed without it (R1FLEET_CACHE=off, each host downloads on its own).
The lab's artifacts are small (a 94 MiB stand-in GGUF) and its mirror is local, so the times show the
deploy's own cost; the byte counts are what scale: a 70B host fetches 40 GiB where this fetches 94 MiB.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from r1fleet.lab import mirror, paths, state  # noqa: E402

PYINFRA = [sys.executable, "-m", "pyinfra", "-y", "inventory.py", "deploy.py"]


def artifacts(served: dict[str, int]) -> dict[str, int]:
    return {p: n for p, n in served.items() if p.startswith(("/models/", "/registry/")) or p.endswith((".tar.zst", ".tgz"))}


def distinct_bytes(paths_served: dict[str, int]) -> int:
    """The bytes of the distinct artifacts among the mirror paths: by content, since the lab registry's weights
    blob is the same file as the stand-in GGUF."""
    files = {mirror.cached_sha256(paths.MIRROR_DIR / p.lstrip("/")): paths.MIRROR_DIR / p.lstrip("/") for p in paths_served}
    return sum(f.stat().st_size for f in files.values())


def reset(hosts: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "r1fleet.lab", "reset", *hosts], check=True, capture_output=True, timeout=900)


def deploy(env: dict[str, str]) -> tuple[float, dict[str, int]]:
    """(seconds, artifact bytes the mirror served during the deploy)."""
    before = artifacts(mirror.served_bytes())
    start = time.monotonic()
    result = subprocess.run(PYINFRA, cwd=ROOT, env={**os.environ, "R1FLEET_FLEET": "lab", **env},
                            capture_output=True, text=True, timeout=3600)
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        sys.exit(f"deploy failed:\n{result.stdout[-3000:]}{result.stderr[-2000:]}")
    after = artifacts(mirror.served_bytes())
    return elapsed, {p: after[p] - before.get(p, 0) for p in after if after[p] != before.get(p, 0)}


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", default="lab-cpu,lab-dual3090,lab-3060", help="the hosts to rebuild (comma-separated)")
    args = parser.parse_args()
    every = [h["name"] for h in state.lab_hosts() if h["state"] == "up"]
    if not every:
        sys.exit("the lab is not up: run `r1fleet lab up` as root")
    rebuilt = [h for h in args.hosts.split(",") if h]
    with tempfile.TemporaryDirectory(prefix="r1fleet-bench-cache-") as cache:
        cached = {"R1FLEET_CACHE_DIR": cache}
        reset(every)
        seconds, fetched = deploy(cached)
        unique = distinct_bytes(fetched)
        print(f"fresh deploy of {len(every)} hosts: {mib(sum(fetched.values()))} from upstream for {mib(unique)} of "
              f"distinct artifacts ({sum(fetched.values()) / unique:.3f}x) in {seconds:.1f} s")
        reset(rebuilt)
        from_cache, fetched = deploy(cached)
        print(f"rebuild of {', '.join(rebuilt)} from the controller's cache: {from_cache:.1f} s, "
              f"{mib(sum(fetched.values()))} from upstream")
        reset(rebuilt)
        from_upstream, fetched = deploy({**cached, "R1FLEET_CACHE": "off"})
        print(f"rebuild of {', '.join(rebuilt)} from upstream (no cache): {from_upstream:.1f} s, "
              f"{mib(sum(fetched.values()))} from upstream")
    return 0


if __name__ == "__main__":
    sys.exit(main())
