"""llama.cpp's reading of --tensor-split, replayed: the flag r1fleet writes places exactly the planned blocks.

The rule (src/llama-model.cpp, load_tensors) spreads n_layer + 1 slots, the output being the last, by the
flag's cumulative float32 shares. The expected placements of the 70B below are what the real llama-server
printed for those flags (docs/research/llamacpp-fit-oracle.md, section 3: `layer N assigned to device`).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from r1fleet.plan.catalog import load_catalog
from r1fleet.hardware import parse_probe
from r1fleet.records import Gpu, Hardware
from r1fleet.plan.planner import plan_host, rehearse
from r1fleet.plan.policy import Policy
from r1fleet.tensor_split import flag_for_layers, output_device, placed_blocks, rescale_blocks, slot_devices

PROBES = Path(__file__).parent.parent / "fixtures" / "probes"


@pytest.mark.parametrize("flag,blocks", [([41, 40], [41, 39]), ([41, 39], [42, 38]), ([40, 41], [40, 40]), ([42, 39], [42, 38])])
def test_replay_matches_what_llama_server_printed_for_the_70b(flag, blocks):
    assert placed_blocks(flag, 80) == blocks
    assert output_device(flag, 80) == 1


def test_the_old_flag_was_off_by_one():
    """The plan's block counts written as the flag put one block too many on the first GPU."""
    assert placed_blocks([41, 39], 80) != [41, 39]
    assert placed_blocks(flag_for_layers([41, 39]), 80) == [41, 39]


@pytest.mark.parametrize("devices", [2, 3, 4])
def test_every_split_of_every_distill_is_placed_as_planned(devices):
    for n_layer in sorted({m.arch.layers for m in load_catalog().models} | {30}):
        step = max(1, n_layer // 12)
        for head in itertools.product(range(0, n_layer + 1, step), repeat=devices - 1):
            if sum(head) > n_layer:
                continue
            blocks = [*head, n_layer - sum(head)]
            flag = flag_for_layers(blocks)
            assert placed_blocks(flag, n_layer) == blocks, (n_layer, blocks, flag)
            assert output_device(flag, n_layer) == devices - 1


def test_partial_offload_leaves_the_first_slots_on_the_cpu():
    devices = slot_devices([1, 1], n_layer=10, n_gpu_layers=5)
    assert devices[:6] == [None] * 6 and set(devices[6:]) == {0, 1}


def test_bad_flags_are_refused():
    with pytest.raises(ValueError):
        flag_for_layers([])
    with pytest.raises(ValueError):
        slot_devices([0, 0], 10)


def _multi_gpu_hosts():
    """The shipped probes' multi-GPU plans plus synthetic 2-4 GPU hosts, equal and unequal."""
    hosts = [parse_probe(p.read_text(), p.stem) for p in sorted(PROBES.glob("*.probe"))]
    cards = {"3090": ("NVIDIA GeForce RTX 3090", 24576, 936.2), "3060": ("NVIDIA GeForce RTX 3060", 12288, 360.0),
             "4060ti": ("NVIDIA GeForce RTX 4060 Ti", 16380, 288.0), "a4000": ("NVIDIA RTX A4000", 16376, 448.0)}
    for combo in [("3090", "3060"), ("3060", "3060"), ("3060", "3060", "3060"), ("4060ti", "3060", "3060"),
                  ("a4000", "a4000", "a4000", "a4000"), ("3090", "3090", "3060"), ("3060", "4060ti", "3060", "4060ti")]:
        gpus = [Gpu(index=i, vendor="nvidia", name=cards[c][0], memory_total_mib=cards[c][1], memory_used_mib=0,
                    memory_free_mib=cards[c][1], bandwidth_gbps=cards[c][2], source="nvidia-smi-query",
                    uuid=f"GPU-{i}", compute_cap="8.6") for i, c in enumerate(combo)]
        hosts.append(Hardware(host="+".join(combo), ram_total_mib=65536, gpus=gpus))
    return hosts


def test_every_multi_gpu_plan_deploys_the_split_it_planned():
    checked = 0
    for hw in _multi_gpu_hosts():
        for policy in (Policy(), Policy(backend="llama.cpp", min_context=4096)):
            plan = plan_host(hw, policy)
            if not plan.tensor_split or len(plan.tensor_split) < 2:
                continue
            for p in (plan, rehearse(plan)):
                assert placed_blocks(p.tensor_split_flag, p.n_layers) == p.tensor_split, hw.host
                assert output_device(p.tensor_split_flag, p.n_layers) == len(p.tensor_split) - 1
            checked += 1
    assert checked >= 6


def test_rehearsal_keeps_the_proportions_for_the_stand_in():
    assert rescale_blocks([41, 39], 30) == [15, 15]
    assert rescale_blocks([20, 10, 10], 30) == [15, 8, 7]
    assert sum(rescale_blocks([7, 11, 13, 17], 24)) == 24
