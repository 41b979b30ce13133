"""Planner: the seed article's hardware tiers, and the cases beyond it (mixed GPUs, busy GPUs, re-runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1fleet.hardware import parse_probe
from r1fleet.plan.catalog import load_catalog
from r1fleet.plan.memory import kv_cache_mib, llama_server_host_mib
from r1fleet.records import Gpu, GpuProcess, Hardware, UnifiedMemory
from r1fleet.plan.placement import gpu_capacity_mib
from r1fleet.plan.placement import placements
from r1fleet.plan.planner import best_attempt, plan_host, rehearse
from r1fleet.plan.policy import Policy

ID = {m.size_label: m.id for m in load_catalog().models}


def gpu(index: int, name: str, mib: int, bandwidth: float, *, used: int = 0, processes=(), vendor="nvidia", source="nvidia-smi-query") -> Gpu:
    return Gpu(
        index=index, vendor=vendor, name=name, memory_total_mib=mib, memory_used_mib=used,
        memory_free_mib=mib - used, bandwidth_gbps=bandwidth, source=source, uuid=f"GPU-{index:08d}-test",
        compute_cap="8.6", processes=list(processes),
    )


def host(*gpus: Gpu, ram_mib: int = 65536, available: int | None = None, unified: UnifiedMemory | None = None) -> Hardware:
    return Hardware(host="h", ram_total_mib=ram_mib, ram_available_mib=available, gpus=list(gpus), unified=unified)


RTX_3090 = ("NVIDIA GeForce RTX 3090", 24576, 936.2)
RTX_4090 = ("NVIDIA GeForce RTX 4090", 24564, 1008.0)
RTX_3060 = ("NVIDIA GeForce RTX 3060", 12288, 360.0)


def test_4gb_card_gets_1_5b():
    plan = plan_host(host(gpu(0, "NVIDIA GeForce GTX 1650", 4096, 128.0)))
    assert plan.model == ID["1.5b"] and plan.backend == "ollama" and plan.fits


@pytest.mark.parametrize("name,mib,bandwidth", [("NVIDIA GeForce RTX 4060", 8188, 272.0), ("NVIDIA GeForce RTX 2060", 6144, 336.0)])
def test_6_to_8gb_cards_get_7b_or_8b(name, mib, bandwidth):
    plan = plan_host(host(gpu(0, name, mib, bandwidth)))
    assert plan.model in (ID["7b"], ID["8b"], ID["8b-0528"])
    assert plan.context_length >= 8192


def test_12gb_gets_14b_with_capped_context():
    plan = plan_host(host(gpu(0, *RTX_3060)))
    assert plan.model == ID["14b"]
    assert 8192 <= plan.context_length < 32768  # capped below max_context by the card
    device = plan.devices[0]
    assert device.planned_mib <= device.capacity_mib == 12288
    assert any("not 32b" in r for r in plan.reasons)


def test_16gb_gets_14b_at_full_context():
    plan = plan_host(host(gpu(0, "NVIDIA GeForce RTX 4060 Ti", 16380, 288.0)))
    assert plan.model == ID["14b"] and plan.context_length == 32768


def test_24gb_gets_32b_on_one_gpu():
    plan = plan_host(host(gpu(0, *RTX_4090)))
    assert (plan.model, plan.backend, plan.placement) == (ID["32b"], "ollama", "gpu")
    assert plan.context_length >= 8192 and plan.tensor_split is None
    assert plan.gpu_uuids == ["GPU-00000000-test"]


def test_two_24gb_gpus_get_70b_on_llama_cpp_with_a_balanced_split():
    plan = plan_host(host(gpu(0, *RTX_3090), gpu(1, *RTX_3090)))
    assert (plan.model, plan.backend, plan.placement) == (ID["70b"], "llama.cpp", "multi-gpu")
    assert sum(plan.tensor_split) == 80
    assert abs(plan.tensor_split[0] - plan.tensor_split[1]) <= 4  # the output tensor tips it a little
    assert plan.context_length >= 8192
    for device in plan.devices:
        assert device.planned_mib <= device.capacity_mib
    assert plan.devices[1].weights_mib > 0 and plan.devices[0].layers == plan.tensor_split[0]
    assert len(plan.gpu_uuids) == 2


def test_apple_silicon_64gb_gets_70b_in_unified_memory():
    mac = host(unified=UnifiedMemory(kind="apple", name="Apple M1 Max", total_mib=65536, gpu_limit_mib=49152, bandwidth_gbps=400.0))
    plan = plan_host(mac)
    assert (plan.model, plan.placement, plan.backend) == (ID["70b"], "unified", "ollama")
    assert plan.unified_memory_mib == 65536 and plan.vendor == "apple"


def test_apple_default_working_set_may_be_raised_but_an_owners_limit_is_kept():
    default = UnifiedMemory(kind="apple", name="Apple M2 Max", total_mib=65536, gpu_limit_mib=49152,
                            gpu_limit_raisable=True, bandwidth_gbps=400.0)
    plan = plan_host(host(unified=default))
    assert plan.devices[0].capacity_mib == 65536 - 6144 and plan.devices[0].planned_mib > 49152
    assert any("raises iogpu.wired_limit_mb" in r for r in plan.reasons)
    owners = default.model_copy(update={"gpu_limit_raisable": False})
    kept = plan_host(host(unified=owners))
    assert kept.devices[0].capacity_mib == 49152 and not any("wired_limit" in r for r in kept.reasons)


def test_linux_unified_memory_plans_name_their_gpu_vendor():
    strix = UnifiedMemory(kind="amd-apu", name="AMD Radeon 8060S", total_mib=131072, gpu_limit_mib=98304, bandwidth_gbps=256.0)
    spark = UnifiedMemory(kind="gb10", name="NVIDIA GB10", total_mib=122880, gpu_limit_mib=115000, bandwidth_gbps=273.0)
    assert plan_host(host(unified=strix)).vendor == "amd"
    assert plan_host(host(unified=spark)).vendor == "nvidia"
    assert plan_host(host(ram_mib=16384, available=15000)).vendor is None


def test_cpu_only_16gb_speed_floor_decides():
    plan = plan_host(host(ram_mib=16384, available=15000))
    assert plan.model == ID["1.5b"] and plan.placement == "cpu"
    assert any("not 7b" in r and "tokens/s" in r for r in plan.reasons)


def test_cpu_bandwidth_from_the_fleet_raises_the_choice():
    plan = plan_host(host(ram_mib=16384, available=15000), Policy(cpu_bandwidth_gbps=60))
    assert plan.model in (ID["7b"], ID["8b"], ID["8b-0528"])


def test_mixed_gpus_keep_the_32b_on_the_big_card():
    plan = plan_host(host(gpu(0, *RTX_3090), gpu(1, *RTX_3060)))
    assert plan.model == ID["32b"] and plan.placement == "gpu"
    assert plan.devices[0].device.startswith("GPU0")


def test_memory_held_by_another_program_is_not_available():
    other = GpuProcess(pid=4242, name="/usr/bin/python3", used_mib=6000)
    plan = plan_host(host(gpu(0, *RTX_4090, used=6010, processes=[other])))
    assert plan.model == ID["14b"]
    assert plan.devices[0].capacity_mib == 24564 - 6010


def test_rerun_while_our_own_model_is_loaded_keeps_the_model():
    own = GpuProcess(pid=77, name="/usr/bin/llama-server", used_mib=22000, own=True)
    busy = host(gpu(0, *RTX_4090, used=22010, processes=[own]))
    assert gpu_capacity_mib(busy.gpus[0]) == 24564 - 10
    assert plan_host(busy).model == ID["32b"]


def test_unknown_usage_without_process_list_counts_as_used():
    assert plan_host(host(gpu(0, *RTX_4090, used=20000))).model == ID["1.5b"]


def test_gpu_without_driver_is_planned_from_lspci():
    fresh = gpu(0, "NVIDIA GeForce RTX 4090", 24564, 1008.0, source="lspci")
    plan = plan_host(host(fresh.model_copy(update={"memory_used_mib": None, "uuid": None})))
    assert plan.model == ID["32b"] and plan.gpu_uuids == []


def test_q8_kv_is_used_only_to_reach_min_context():
    policy = Policy(min_context=32768, max_context=32768)
    plan = plan_host(host(gpu(0, *RTX_4090)), policy)
    assert plan.kv_cache_type == "q8_0" and plan.context_length == 32768
    assert plan_host(host(gpu(0, *RTX_4090)), Policy(min_context=32768, max_context=32768, kv_types=["f16"])).model != ID["32b"]


def test_forced_model_that_does_not_fit_says_so():
    plan = plan_host(host(gpu(0, *RTX_3060)), model="70b")
    assert plan.model == ID["70b"] and not plan.fits
    assert plan.devices and plan.devices[0].planned_mib > plan.devices[0].capacity_mib
    assert "does NOT fit" in plan.reasons[0]


PROBES = Path(__file__).resolve().parents[1] / "fixtures" / "probes"


def probed(name: str) -> Hardware:
    return parse_probe((PROBES / f"{name}.probe").read_text(), name)


def test_a_model_that_does_not_fit_says_by_how_much_where_the_largest_context_and_what_would_fit():
    """The 70B at 65536 on two 3090s (issue 22 item 8): the closest placement (the split) with each device's overflow,
    the largest context that fits there, and a third 3090; every claim checked by planning it."""
    hw = probed("dual-rtx3090")
    plan = plan_host(hw, model="70b", context=65536)
    assert not plan.fits and plan.placement == "multi-gpu" and plan.est_tokens_per_second is None
    over = [d.planned_mib - d.capacity_mib for d in plan.devices]
    assert all(o > 0 for o in over)
    assert plan.reasons[0] == (
        f"requested: 70b does NOT fit at context 65536 ({plan.kv_cache_type} KV): closest on GPU0 NVIDIA GeForce RTX 3090 "
        f"+ GPU1 NVIDIA GeForce RTX 3090: GPU0 {plan.devices[0].planned_mib:,}/23,975 MiB ({over[0]:,} over), "
        f"GPU1 {plan.devices[1].planned_mib:,}/23,975 MiB ({over[1]:,} over)")
    largest = plan.reasons[1]
    assert largest.startswith("the largest context that fits: ") and "(q8_0 KV) on GPU0 NVIDIA GeForce RTX 3090 + GPU1" in largest
    context = int(largest.split(": ")[1].split()[0])
    q8 = Policy(kv_types=["q8_0"])
    assert plan_host(hw, q8, model="70b", context=context).fits
    assert not plan_host(hw, q8, model="70b", context=context + 1024).fits
    assert plan.reasons[2] == ("it would fit at context 65536 with: a third NVIDIA GeForce RTX 3090 (23,975 MiB free, "
                               "split by llama.cpp)")
    third = hw.model_copy(update={"gpus": [*hw.gpus, hw.gpus[0].model_copy(update={"index": 2, "uuid": "GPU-third"})]})
    assert plan_host(third, model="70b", context=65536).fits
    assert plan.reasons[3].startswith("elsewhere: needs 52,275 MiB at context 65536 (q8_0 KV) but GPU0 NVIDIA GeForce "
                                      "RTX 3090 has 23,975 MiB; on system RAM it is estimated at 0.3 tokens/s")


def test_a_kv_type_the_policy_leaves_out_is_named_when_it_would_fit():
    hw = probed("rtx4090")
    f16 = Policy(kv_types=["f16"])
    plan = plan_host(hw, f16, model="32b", context=24576)
    assert not plan.fits and "with: a q8_0 KV cache (--kv-type q8_0, or policy kv_types)" in plan.reasons[2]
    assert plan_host(hw, Policy(kv_types=["q8_0"]), model="32b", context=24576).fits
    assert plan.reasons[1] == "the largest context that fits: 16384 (f16 KV) on GPU0 NVIDIA GeForce RTX 4090, est 39.4 tokens/s"


def test_a_model_that_fits_but_runs_too_slowly_says_so_with_its_speed():
    plan = plan_host(probed("dgx-spark"), model="70b")
    assert not plan.fits and plan.est_tokens_per_second == 4.1 and plan.placement == "unified"
    assert plan.reasons[0] == ("requested: 70b does NOT fit at context 8192 (f16 KV): on unified NVIDIA GB10 it is "
                               "estimated at 4.1 tokens/s, below min_tokens_per_second 5")
    assert plan.reasons[1] == "no context fits 70b here at min_tokens_per_second 5 or faster"
    assert "min_tokens_per_second lowered to 4.1" in plan.reasons[2]
    assert plan_host(probed("dgx-spark"), Policy(min_tokens_per_second=4.1), model="70b").fits


def test_a_context_beyond_every_distill_is_said_once_with_the_largest_that_fits():
    plan = plan_host(probed("dual-rtx3090"), context=200000)
    assert plan.model is None
    assert plan.reasons[:3] == [
        "nothing fits: even 1.5b does not", "not 1.5b: context 200000 is beyond what 1.5b was trained for (131072)",
        "the largest context that fits: 131072 (f16 KV) on GPU0 NVIDIA GeForce RTX 3090, est 678.6 tokens/s"]
    assert sum("beyond what" in r for r in plan.reasons) == 1
    options = placements(probed("dual-rtx3090"), Policy())  # a rejected model's reason names each failure once too
    assert best_attempt(load_catalog().find("1.5b"), options, Policy(), 200000).why_not == (
        "context 200000 is beyond what 1.5b was trained for (131072)")


def test_forced_context_is_exact():
    plan = plan_host(host(gpu(0, *RTX_4090)), model="32b", context=4096)
    assert plan.fits and plan.context_length == 4096


def test_forced_context_beyond_training_is_explained():
    plan = plan_host(host(gpu(0, *RTX_4090)), model="32b", context=262144)
    assert not plan.fits and "beyond what 32b was trained for (131072)" in plan.reasons[0]


RTX_4060 = ("NVIDIA GeForce RTX 4060", 8188, 272.0)
# Between the two 8B distills' needs at context 8192 with a q8_0 KV cache (R1-0528's 6,686 MiB, the Llama's 6,191)
ONLY_THE_LLAMA_8B = ("NVIDIA GeForce RTX 4060", 6400, 272.0)


def test_prefer_math_picks_the_best_aime_distill_that_fits():
    assert plan_host(host(gpu(0, *RTX_4060)), Policy(prefer="math")).model == ID["8b-0528"]  # AIME 2024 86.0
    # where R1-0528's distill does not fit, the Qwen-Math 7B (55.5) before the Llama 8B (50.4)
    card = gpu(0, *ONLY_THE_LLAMA_8B)
    assert plan_host(host(card), Policy(prefer="largest")).model == ID["8b"]
    assert plan_host(host(card), Policy(prefer="math")).model == ID["7b"]


def test_largest_serves_r1_0528s_8b_and_says_why_not_the_llama_and_how_to_get_it():
    plan = plan_host(host(gpu(0, *RTX_4060)))
    assert plan.model == ID["8b-0528"] and plan.ollama_tag == "deepseek-r1:8b-0528-qwen3-q4_K_M"
    choice = [r for r in plan.reasons if "rather than" in r]
    assert choice == [
        "8b-0528 (DeepSeek-R1-0528-Qwen3-8B) rather than 8b (DeepSeek-R1-Distill-Llama-8B), by prefer: largest (more "
        "parameters): AIME 2024 86 vs 50.4, AIME 2025 76.3 vs -, MATH-500 - vs 89.1, 6,135 vs 5,717 MiB of weights and "
        "f16 KV at context 8192; prefer: compact tries 8b before 8b-0528, or pin model: 8b"
    ]


def test_prefer_compact_serves_the_llama_8b_and_names_the_other():
    plan = plan_host(host(gpu(0, *RTX_4060)), Policy(prefer="compact"))
    assert plan.model == ID["8b"] and plan.fits
    assert any(r.startswith("8b (DeepSeek-R1-Distill-Llama-8B) rather than 8b-0528") and
               "prefer: largest tries 8b-0528 before 8b" in r for r in plan.reasons)
    # compact changes the order within a size only: a host that holds the 14B still gets it
    assert plan_host(host(gpu(0, *RTX_3060)), Policy(prefer="compact")).model == ID["14b"]


def test_the_llama_8b_where_r1_0528s_does_not_fit_says_so_without_a_choice():
    plan = plan_host(host(gpu(0, *ONLY_THE_LLAMA_8B)))
    assert plan.model == ID["8b"]
    assert any(r.startswith("not 8b-0528: needs ") and "(q8_0 KV) but GPU0 NVIDIA GeForce RTX 4060 has 6,400 MiB" in r
               for r in plan.reasons)
    assert not any("rather than" in r for r in plan.reasons)
    # compact tries the Llama first: it says the other would not fit either, rather than offer prefer: largest
    compact = plan_host(host(gpu(0, *ONLY_THE_LLAMA_8B)), Policy(prefer="compact"))
    (choice,) = [r for r in compact.reasons if "rather than" in r]
    assert "8b-0528 would not fit here either: needs " in choice and "prefer: largest" not in choice


def test_a_pinned_8b_is_served_without_a_choice_line():
    for pinned in ("8b", "8b-0528"):
        plan = plan_host(host(gpu(0, *RTX_4060)), Policy(model=pinned))
        assert plan.model == ID[pinned] and not any("rather than" in r for r in plan.reasons)


def test_r1_0528s_8b_is_planned_on_ollamas_larger_layer_and_its_own_kv():
    plan = plan_host(host(gpu(0, *RTX_4060)), model="8b-0528", context=8192)
    device = plan.devices[0]
    # 36 layers x 8 KV heads x 128 x 2 (K, V) x 2 B x 8192 tokens = 1,152 MiB
    assert device.kv_cache_mib == 1152
    # Ollama's 5,225,373,760-byte layer less the token embeddings llama.cpp keeps in host memory (151936 x 4096 x 4.5/8)
    assert device.weights_mib == round((5225373760 - 151936 * 4096 * 4.5 / 8) / 2**20)
    assert plan.disk_needed_mib == round(5225373760 / 2**20)


def test_speed_floor_rejects_a_slow_gpu():
    plan = plan_host(host(gpu(0, "NVIDIA Tesla P40", 24576, 347.0)), Policy(min_tokens_per_second=15))
    assert plan.model == ID["14b"]
    assert any("not 32b" in r and "below min_tokens_per_second" in r for r in plan.reasons)


def test_kv_cache_matches_the_architecture_formula():
    m = load_catalog().find("32b")
    assert kv_cache_mib(m, 64, 8192, "f16") == pytest.approx(2048.0)


def test_plan_is_deterministic():
    hw = host(gpu(0, *RTX_3090), gpu(1, *RTX_3090))
    assert plan_host(hw).model_dump() == plan_host(hw).model_dump()


def test_rehearsal_keeps_the_slot_and_swaps_the_model():
    plan = plan_host(host(gpu(0, *RTX_3090), gpu(1, *RTX_3090)))
    r = rehearse(plan)
    stand_in = load_catalog().stand_ins[0]
    assert r.rehearsal and r.target_model == ID["70b"] and r.model == stand_in.id
    assert (r.backend, r.gpu_uuids) == (plan.backend, plan.gpu_uuids)
    # the same proportions over the stand-in's blocks, so the deployed flag places what verify expects
    assert sum(r.tensor_split) == stand_in.arch.layers == r.n_layers and r.tensor_split == [15, 15]
    assert r.tensor_split_flag == [15, 16]
    assert r.context_length == min(plan.context_length, stand_in.arch.context_train)
    assert r.gguf.file == stand_in.gguf.file and r.gguf.sha256 == stand_in.gguf.sha256


def test_nothing_fits_on_a_tiny_host():
    plan = plan_host(host(ram_mib=2048, available=1200))
    assert plan.model is None and not plan.fits and "nothing fits" in plan.reasons[0]


# llama.cpp's own per-device projection of the 70B split 41 | 39 + output over two devices (llama-server's
# --fit pre-pass, f16 KV; docs/research/llamacpp-fit-oracle.md section 3): (weights + KV + compute) MiB.
LLAMA_CPP_PROJECTION_70B = {19456: (23654, 23324), 8192: (21806, 21564)}


@pytest.mark.parametrize("context", sorted(LLAMA_CPP_PROJECTION_70B))
def test_split_estimate_agrees_with_llama_cpps_own_projection(context):
    from r1fleet.plan.memory import Slot
    from r1fleet.plan.placement import device_plans

    model = load_catalog().find("70b")
    slots = (Slot("GPU0", 24124, "cuda"), Slot("GPU1", 24124, "cuda"))
    devices = device_plans(model, slots, [41, 39], context, "f16", True, 0)
    for device, projected in zip(devices, LLAMA_CPP_PROJECTION_70B[context]):
        ours = device.weights_mib + device.kv_cache_mib + device.compute_mib
        assert abs(ours - projected) <= 64, (device.device, ours, projected)


def test_capacity_is_what_the_driver_reports_free_plus_our_own_backend():
    busy = gpu(0, *RTX_4090, used=22830, processes=[GpuProcess(pid=7, name="/usr/local/bin/ollama", used_mib=22528, own=True)])
    busy = busy.model_copy(update={"memory_free_mib": 1134})
    assert gpu_capacity_mib(busy) == 1134 + 22528
    before_driver = busy.model_copy(update={"memory_free_mib": None, "memory_used_mib": None, "processes": []})
    assert gpu_capacity_mib(before_driver) == RTX_4090[1] - 452  # lspci only: the driver's usual reserve out


def test_70b_on_two_3090s_keeps_a_usable_context_with_a_real_margin():
    """Capacity as CUDA allocates it, llama.cpp's pipeline compute buffers: still the 70B, at >= 8192 f16."""
    hw = host(gpu(0, *RTX_3090), gpu(1, *RTX_3090))
    hw.gpus[0].memory_free_mib = hw.gpus[1].memory_free_mib = 23975  # nvidia-smi free on an idle 3090
    plan = plan_host(hw)
    assert plan.model == ID["70b"] and plan.kv_cache_type == "f16" and plan.context_length >= 8192
    for device in plan.devices:  # beyond llama.cpp's buffers: CUDA context and pools, plus the headroom
        assert device.capacity_mib - (device.weights_mib + device.kv_cache_mib + device.compute_mib) >= 600 + 512


@pytest.mark.parametrize("cap", ["5.2", "7.2"])
def test_flash_attention_follows_the_runtimes_rule_for_old_gpus(cap):
    """Maxwell (5.x) and Jetson Xavier (7.2): Ollama turns flash attention off, so the KV cache stays f16."""
    card = gpu(0, "NVIDIA GeForce GTX 980 Ti", 6144, 336.0).model_copy(update={"compute_cap": cap})
    plan = plan_host(host(card), Policy(min_context=4096))
    assert plan.fits and plan.flash_attention is False and plan.kv_cache_type == "f16"
    assert any("flash attention off" in r and cap in r for r in plan.reasons)
    forced = plan_host(host(card), Policy(min_context=4096, flash_attention="on"))
    assert forced.flash_attention and forced.flash_attention_forced


def test_flash_attention_off_costs_the_attention_scores_on_each_device():
    """Without flash attention each device holds one layer's f32 scores and an f32 mask per copy; the
    growth per token was checked against llama.cpp's projection at two contexts (bench/llamacpp_oracle.py)."""
    from r1fleet.plan.memory import device_compute_mib

    model = load_catalog().find("70b")
    for split_first, copies in ((None, 1), (True, 4), (False, 4)):
        on = device_compute_mib(model, 16384, True, split_first) - device_compute_mib(model, 8192, True, split_first)
        off = device_compute_mib(model, 16384, False, split_first) - device_compute_mib(model, 8192, False, split_first)
        assert on == pytest.approx(copies * 512 * 8192 * 2 / 2**20)
        assert off == pytest.approx((64 * 512 * 4 + copies * 512 * 4) * 8192 / 2**20)


# A distill joins the catalog before bench/llamacpp_oracle.py --write (root, lab up) has measured it: until then the
# planner takes Ollama's graph estimate for it, checked below to be the larger figure.
NOT_YET_MEASURED: set[str] = set()


def test_every_distill_has_llama_cpps_compute_buffers():
    from r1fleet.plan.memory import compute_table

    table = compute_table()
    assert NOT_YET_MEASURED.isdisjoint(table), "measured now: drop it from NOT_YET_MEASURED"
    for model in load_catalog().models:
        if model.id in NOT_YET_MEASURED:
            continue
        entry = table[model.id]
        for where in ("single", "split_first", "split_other"):
            assert 0 < entry[where]["fa_off"] < entry[where]["fa_on"] < 1024, (model.id, where)
        assert entry["split_first"]["fa_on"] >= entry["split_other"]["fa_on"]


def test_an_unmeasured_distill_is_planned_on_the_larger_graph_estimate():
    """Ollama's graph estimate (vocab-sized logits) is above llama.cpp's measured buffer for the Llama 8B, whose shape
    (4096 wide, 32 heads) R1-0528's Qwen3-8B shares, at every context and micro-batch the planner uses."""
    from r1fleet.plan.memory import device_compute_mib, llama_server_compute_mib

    catalog = load_catalog()
    llama_8b = catalog.find("8b")
    # R1-0528's 8B as it was before its measurement: the same model under an id the table does not hold
    unmeasured = catalog.find("8b-0528").model_copy(update={"id": "deepseek-r1-0528-qwen3-8b-unmeasured"})
    for model in [unmeasured, *(catalog.find(model_id) for model_id in NOT_YET_MEASURED)]:
        model_id = model.id
        assert llama_server_compute_mib(model, 8192, True, None) is None
        for context in (8192, 32768):
            for fa in (True, False):
                for split_first, ubatch in ((None, 512), (None, 1024), (None, 2048), (True, 512), (False, 512)):
                    measured = llama_server_compute_mib(llama_8b, context, fa, split_first, ubatch)
                    planned = device_compute_mib(model, context, fa, split_first, ubatch)
                    assert planned > measured, (model_id, context, fa, split_first, ubatch)


def test_ollama_picks_its_batch_from_context_and_free_memory():
    """Ollama's automatic batch (server/sched.go): larger with a long context and room to spare, never on a tight GPU."""
    from r1fleet.plan.memory import ollama_ubatch

    m14 = load_catalog().find("14b")
    assert ollama_ubatch(m14, 4096, True, 80000, cuda=True) == 512        # short context
    assert ollama_ubatch(m14, 16384, True, 80000, cuda=True) == 1024
    assert ollama_ubatch(m14, 40960, True, 80000, cuda=True) == 2048
    assert ollama_ubatch(m14, 40960, True, 16000, cuda=True) == 512       # weights + KV above 75 % of free
    assert ollama_ubatch(m14, 16384, False, 8192, cuda=True) == 256       # no flash attention on an 8 GiB GPU
    h200 = plan_host(host(gpu(0, "NVIDIA H200", 143771, 4800.0)))
    assert h200.backend == "ollama" and h200.ubatch == 1024
    assert plan_host(host(gpu(0, *RTX_4090))).ubatch == 512               # a tight 24 GB card stays at 512


def test_the_context_is_padded_up_to_what_llama_cpp_allocates():
    """llama.cpp rounds the context up to its padding: the estimate must count the padded tokens, never fewer."""
    from r1fleet.plan.memory import constants, padded_context

    pad = constants().kv_pad_tokens
    model = load_catalog().find("8b")
    for context in (1, pad - 1, pad, pad + 1, 3 * pad + 7, 8192, 8193):
        padded = padded_context(context)
        assert padded % pad == 0 and context <= padded < context + pad, (context, padded)
        # the KV cache of an unpadded context costs what the padded one does
        assert kv_cache_mib(model, 10, context, "f16") == kv_cache_mib(model, 10, padded, "f16")


def test_a_split_follows_each_devices_free_room():
    """The layers are spread in proportion to each device's room after its fixed costs (within one layer), so
    a larger card holds more of them; every device's plan stays within its capacity."""
    from r1fleet.plan.memory import Slot, fixed_cost_mib
    from r1fleet.plan.placement import device_plans, split_layers, split_position

    model = load_catalog().find("32b")
    slots = (Slot("GPU0", 49140, "cuda"), Slot("GPU1", 24564, "cuda"))
    context, kv, fa, headroom = 8192, "f16", True, 1024
    layers = split_layers(model, slots, context, kv, fa, headroom)
    assert layers is not None and sum(layers) == model.arch.layers
    rooms = [slot.capacity_mib - fixed_cost_mib(model, slot, last=i == len(slots) - 1, context=context,
                                                 flash_attention=fa, headroom_mib=headroom,
                                                 split_first=split_position(i, len(slots)))
             for i, slot in enumerate(slots)]
    for count, room in zip(layers, rooms):
        assert abs(count - model.arch.layers * room / sum(rooms)) <= 1, (layers, rooms)
    assert layers[0] > layers[1]
    assert all(d.planned_mib <= d.capacity_mib for d in device_plans(model, slots, layers, context, kv, fa, headroom))


def test_a_devices_plan_is_the_sum_of_its_parts_and_its_headroom():
    """planned_mib (what the planner compares with the capacity) counts every part it reports, and the headroom
    the policy asks for on top of them: more headroom plans exactly that much more."""
    from r1fleet.plan.memory import Slot, estimate_device

    model = load_catalog().find("32b")
    slot = Slot("GPU0", 24564, "cuda")
    plans = [estimate_device(model, slot, layers=64, last=True, context=8192, kv_type="f16", flash_attention=True,
                             headroom_mib=headroom) for headroom in (0, 1024)]
    for d in plans:
        assert d.planned_mib == d.weights_mib + d.kv_cache_mib + d.compute_mib + d.overhead_mib + d.headroom_mib
        assert min(d.weights_mib, d.kv_cache_mib, d.compute_mib, d.overhead_mib) > 0
    assert plans[1].planned_mib - plans[0].planned_mib == 1024 and plans[1].headroom_mib == 1024


def test_the_largest_model_that_fits_is_chosen_whatever_the_catalogs_order():
    """Candidates are tried largest first: the catalog's own order (here reversed) does not decide."""
    catalog = load_catalog()
    reversed_catalog = catalog.model_copy(update={"models": list(reversed(catalog.models))})
    probe = Path(__file__).resolve().parents[1] / "fixtures" / "probes" / "rtx4090.probe"
    hw = parse_probe(probe.read_text(), "rtx4090")
    chosen = plan_host(hw, catalog=reversed_catalog)
    assert chosen.model == plan_host(hw, catalog=catalog).model
    fitting = [m for m in catalog.models if plan_host(hw, catalog=catalog, model=m.id).fits]
    assert chosen.model == max(fitting, key=lambda m: m.params_b).id
    assert len(fitting) < len(catalog.models)  # something larger did not fit: the order mattered


# ---------------------------------------------------------------- llama-server's prompt cache in host RAM (--cache-ram)


def test_a_split_on_a_host_with_ram_to_spare_keeps_llama_cpps_default_prompt_cache():
    plan = plan_host(host(gpu(0, *RTX_3090), gpu(1, *RTX_3090), ram_mib=131072))
    assert plan.backend == "llama.cpp" and plan.cache_ram_mib == 8192
    assert not any(r.startswith("host RAM") for r in plan.reasons)


def test_a_split_on_a_small_ram_host_caps_the_prompt_cache_at_what_is_left():
    plan = plan_host(host(gpu(0, *RTX_3090), gpu(1, *RTX_3090), ram_mib=8192))
    model = load_catalog().find(plan.model)
    # 8192 MiB of RAM - 2048 for the system - the 70B's token embeddings and the CPU's compute buffer (830 MiB)
    held = llama_server_host_mib(model, plan.context_length, plan.flash_attention)
    assert round(held) == 830
    assert plan.cache_ram_mib == (8192 - 2048 - 830) // 256 * 256 == 5120
    assert any("prompt cache capped at 5,120 MiB (--cache-ram 5120)" in r for r in plan.reasons)


def test_a_host_whose_ram_the_server_fills_gets_no_prompt_cache():
    plan = plan_host(host(gpu(0, *RTX_3090), gpu(1, *RTX_3090), ram_mib=2560))
    assert plan.cache_ram_mib == 0
    assert any("prompt cache off (--cache-ram 0)" in r for r in plan.reasons)


def test_on_the_cpu_the_prompt_cache_gets_what_the_plan_leaves_of_the_ram():
    plan = plan_host(host(ram_mib=6144), Policy(backend="llama.cpp"))
    assert (plan.placement, plan.backend) == ("cpu", "llama.cpp")
    left = 6144 - 2048 - plan.devices[0].planned_mib
    assert plan.cache_ram_mib == min(8192, left // 256 * 256) and plan.cache_ram_mib < 8192


def test_ollama_plans_carry_no_prompt_cache():
    assert plan_host(host(gpu(0, *RTX_4090))).cache_ram_mib is None
