"""Probe documents captured by r1fleet/probe/probe.sh on a real NVIDIA H200 host (tests/fixtures/device/README.md)."""

from __future__ import annotations

from pathlib import Path

from r1fleet.hardware import parse_probe
from r1fleet.plan.placement import gpu_capacity_mib
from r1fleet.plan.planner import plan_host

DEVICE = Path(__file__).resolve().parents[1] / "fixtures" / "device"


def test_idle_h200_is_parsed_from_the_real_capture():
    hw = parse_probe((DEVICE / "h200-idle.probe").read_text(), "h200")
    (gpu,) = hw.gpus
    assert (gpu.name, gpu.memory_total_mib, gpu.driver_version, gpu.compute_cap) == ("NVIDIA H200", 143771, "580.159.04", "9.0")
    assert gpu.uuid == "GPU-f79c6ffd-85ce-f902-8ed8-db69b89e5281" and gpu.processes == []
    assert hw.os.id == "ubuntu" and hw.os.version_id == "24.04" and hw.cpu_count == 16 and hw.avx512
    assert hw.ram_total_mib == 131981020 // 1024


def test_busy_h200_process_of_another_program_is_not_free():
    hw = parse_probe((DEVICE / "h200-busy.probe").read_text(), "h200")
    (gpu,) = hw.gpus
    assert [(p.pid, p.name, p.used_mib) for p in gpu.processes] == [(441, "python3", 20998)]
    assert gpu.memory_used_mib == 21007
    # what CUDA can allocate: nvidia-smi's free, with the driver's reserve (615 MiB here) also out
    assert gpu_capacity_mib(gpu) == gpu.memory_free_mib == 143771 - 21007 - 614
    plan = plan_host(hw)
    assert plan.model == "deepseek-r1-distill-llama-70b" and plan.backend == "ollama"
    assert plan.devices[0].capacity_mib == gpu.memory_free_mib
