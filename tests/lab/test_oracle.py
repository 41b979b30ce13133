"""Lab: the planner's per-device memory agrees with llama.cpp's own projection, within 64 MiB.

For every GPU plan of the shipped probes (one GPU and split), the real llama-server of a lab host loads a
shape-only GGUF of the planned model over llama.cpp RPC devices and prints each device's model, KV and
compute buffers (r1fleet/lab/oracle.py); the planner's weights + KV + compute must match per device.
Root + lab only (tests/lab/conftest.py). bench/llamacpp_oracle.py prints the wider table.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from r1fleet.plan.catalog import load_catalog
from r1fleet.hardware import parse_probe
from r1fleet.lab.oracle import project
from r1fleet.plan.planner import plan_host

pytest.importorskip("gguf")

PROBES = Path(__file__).resolve().parents[1] / "fixtures" / "probes"
TOLERANCE_MIB = 64


def gpu_plans():
    plans = [plan_host(parse_probe(p.read_text(), p.stem)) for p in sorted(PROBES.glob("*.probe"))]
    return [p for p in plans if p.fits and p.placement in ("gpu", "multi-gpu")]


@pytest.mark.parametrize("plan", gpu_plans(), ids=lambda p: p.host)
def test_planner_matches_llama_cpps_projection(lab, plan):
    model = load_catalog().find(plan.model)
    blocks = plan.tensor_split or [model.arch.layers]
    projected = project(model, blocks, plan.context_length, plan.kv_cache_type, plan.flash_attention, ubatch=plan.ubatch)
    assert len(projected) == len(plan.devices)
    # The planner holds the larger of the GGUF and the Ollama tag's layer (Model.weights_bytes: Ollama quantized
    # R1-0528's 8B itself, 188 MiB larger); llama.cpp here loads the GGUF, so the excess per block is set aside.
    excess_per_block = (model.weights_bytes - model.gguf.size_bytes) / 2**20 / model.arch.layers
    for device, theirs, device_blocks in zip(plan.devices, projected, blocks):
        ours = device.weights_mib - excess_per_block * device_blocks + device.kv_cache_mib + device.compute_mib
        assert device.kv_cache_mib == theirs.context_mib, (plan.host, device.device, theirs)
        assert abs(ours - theirs.total_mib) <= TOLERANCE_MIB, (plan.host, device.device, ours, theirs)


def test_flash_attention_off_matches_too(lab):
    model = load_catalog().find("14b")
    (theirs,) = project(model, [model.arch.layers], 12288, flash_attention=False)
    from r1fleet.plan.memory import Slot
    from r1fleet.plan.placement import device_plans

    (ours,) = device_plans(model, (Slot("GPU0", 10**6, "cuda"),), [model.arch.layers], 12288, "f16", False, 0)
    assert abs(ours.weights_mib + ours.kv_cache_mib + ours.compute_mib - theirs.total_mib) <= TOLERANCE_MIB
