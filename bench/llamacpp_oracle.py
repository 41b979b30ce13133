"""The memory estimator against llama.cpp's own per-device projection, for every distill.

Run (root, lab up: `sudo r1fleet lab up`):
    python bench/llamacpp_oracle.py            # print planner vs llama.cpp per device (target: within 64 MiB)
    python bench/llamacpp_oracle.py --write    # measure the compute buffers again into r1fleet/plan/compute_buffers.yaml

llama.cpp's figures come from the real llama-server (Debian's build in the lab) loading a shape-only
GGUF of each model over llama.cpp RPC devices (r1fleet/lab/oracle.py); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402

from r1fleet.plan.catalog import load_catalog  # noqa: E402
from r1fleet.hardware import parse_probe  # noqa: E402
from r1fleet.lab.oracle import project  # noqa: E402
from r1fleet.plan.memory import COMPUTE_TABLE, Slot, compute_entry, compute_slope_mib  # noqa: E402
from r1fleet.plan.placement import device_plans  # noqa: E402
from r1fleet.plan.planner import plan_host  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROBES = ROOT / "tests" / "fixtures" / "probes"
MEASURE_AT = 8192
OLLAMA_UBATCHES = (256, 1024, 2048)
TARGET_MIB = 64


def measure_table() -> dict:
    """Each distill's compute buffers at context 0: what llama.cpp reports at MEASURE_AT less the part that grows."""
    models = {}
    for model in load_catalog().models:
        half = model.arch.layers // 2
        entry: dict[str, dict[str, int]] = {}
        for fa in (True, False):
            key = "fa_on" if fa else "fa_off"
            for ub in (512, *OLLAMA_UBATCHES):  # Ollama's own batch choices, on one device
                (single,) = project(model, [model.arch.layers], MEASURE_AT, flash_attention=fa, ubatch=ub)
                base = single.compute_mib - compute_slope_mib(model, MEASURE_AT, fa, split=False, ubatch=ub)
                entry.setdefault(compute_entry(None, ub), {})[key] = round(base)
            first, other = project(model, [half, model.arch.layers - half], MEASURE_AT, flash_attention=fa)
            for where, device in (("split_first", first), ("split_other", other)):
                entry.setdefault(where, {})[key] = round(device.compute_mib - compute_slope_mib(model, MEASURE_AT, fa, split=True))
        models[model.id] = entry
        print(f"measured {model.id}: {entry}", file=sys.stderr)
    return models


def cases() -> list[tuple[str, object, list[int], int, str, bool, int]]:
    """(label, model, blocks per device, context, kv type, flash attention, ubatch): every distill on one and two
    devices at the planner's usual contexts, one device at Ollama's larger batches, and every GPU plan of the
    shipped probes."""
    out = []
    for model in load_catalog().models:
        half = model.arch.layers // 2
        for context in (8192, 32768):
            out.append((f"{model.size_label} 1 dev", model, [model.arch.layers], context, "f16", True, 512))
            out.append((f"{model.size_label} 2 dev", model, [half, model.arch.layers - half], context, "f16", True, 512))
        out.append((f"{model.size_label} 1 dev FA off", model, [model.arch.layers], 8192, "f16", False, 512))
        out.append((f"{model.size_label} 1 dev ub 2048", model, [model.arch.layers], 40960, "f16", True, 2048))
    for path in sorted(PROBES.glob("*.probe")):
        plan = plan_host(parse_probe(path.read_text(), path.stem))
        if plan.fits and plan.placement in ("gpu", "multi-gpu"):
            model = load_catalog().find(plan.model)
            blocks = plan.tensor_split or [model.arch.layers]
            out.append((f"probe {path.stem}", model, blocks, plan.context_length, plan.kv_cache_type,
                        plan.flash_attention, plan.ubatch))
    return out


def compare() -> int:
    print(f"{'case':<28} {'ctx':>6} {'kv':>5} {'ub':>5} {'dev':>4} {'llama.cpp w+kv+c':>18} {'planner':>18} {'diff':>6}")
    worst = 0
    for label, model, blocks, context, kv, fa, ub in cases():
        slots = tuple(Slot(f"GPU{i}", 10**6, "cuda") for i in range(len(blocks)))
        ours = device_plans(model, slots, blocks, context, kv, fa, 0, ub if len(blocks) == 1 else None)
        theirs = project(model, blocks, context, kv, fa, ubatch=ub)
        for i, (o, t) in enumerate(zip(ours, theirs)):
            mine = o.weights_mib + o.kv_cache_mib + o.compute_mib
            diff = mine - t.total_mib
            worst = max(worst, abs(diff))
            print(f"{label:<28} {context:>6} {kv:>5} {ub:>5} {i:>4} "
                  f"{t.model_mib:>6}+{t.context_mib:>5}+{t.compute_mib:>4} {o.weights_mib:>6}+{o.kv_cache_mib:>5}+{o.compute_mib:>4} {diff:>+6}")
    print(f"worst |diff|: {worst} MiB; target within {TARGET_MIB} MiB: {'met' if worst <= TARGET_MIB else 'NOT met'}")
    return 0 if worst <= TARGET_MIB else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"measure the compute buffers into {COMPUTE_TABLE}")
    args = parser.parse_args()
    if args.write:
        header = COMPUTE_TABLE.read_text().split("\nmodels:")[0]
        body = yaml.safe_dump({"models": measure_table()}, sort_keys=True)
        COMPUTE_TABLE.write_text(header + "\n" + body)
    sys.exit(compare())
