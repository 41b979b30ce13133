"""Plan 1,000 hosts' probe documents and print how long parsing and planning take.

Run: python bench/plan_speed.py [N]     (target: planning well under a second for 1,000 hosts)
The documents cycle through tests/fixtures/probes/*.probe.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from r1fleet.hardware import parse_probe  # noqa: E402
from r1fleet.plan.planner import plan_host  # noqa: E402


def main(count: int) -> None:
    documents = [(p.stem, p.read_text()) for p in sorted((ROOT / "tests/fixtures/probes").glob("*.probe"))]
    work = [(f"{name}-{i}", text) for i, (name, text) in zip(range(count), documents * (count // len(documents) + 1))]
    plan_host(parse_probe(work[0][1], work[0][0]))  # load catalog, tables and constants once
    start = time.perf_counter()
    hardware = [parse_probe(text, name) for name, text in work]
    parsed = time.perf_counter()
    plans = [plan_host(hw) for hw in hardware]
    planned = time.perf_counter()
    models = {}
    for plan in plans:
        models[plan.model] = models.get(plan.model, 0) + 1
    print(f"hosts: {len(plans)} ({len(documents)} distinct probe documents)")
    print(f"parse: {parsed - start:.3f} s   plan: {planned - parsed:.3f} s   per host: {(planned - start) / len(plans) * 1e3:.2f} ms")
    print("models:", ", ".join(f"{m}: {n}" for m, n in sorted(models.items(), key=lambda x: str(x[0]))))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
