"""llama-server's own memory account (its memory breakdown table) read from real captured logs, judged against the
plan, and shown by status and verify (issue 23 item 11)."""

from __future__ import annotations

from pathlib import Path

import pytest

from r1fleet.hardware import parse_probe
from r1fleet.plan.planner import plan_host, rehearse
from r1fleet.status.readings import parse_status
from r1fleet.status.report import host_status
from r1fleet.status.table import status_table
from r1fleet.verify.judge import device_accounts, memory_problems, memory_summary
from r1fleet.verify.readings import DeviceMemory, MemoryBreakdown, parse_memory_breakdown
from r1fleet.verify.table import host_result, results_table

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
RPC_LOAD_LOG = (FIXTURES / "llama-server-load-log__rpc-2dev__b11669.txt").read_text()
START_LOG = (FIXTURES / "llama-server-start__lab-dual3090__b11669.txt").read_text()
STOP_LOG = (FIXTURES / "llama-server-stop__lab-dual3090__b11669.txt").read_text()
STATUS_DOC = (FIXTURES / "status" / "llama-memory__lab-dual3090.txt").read_text()
DUAL_3090 = parse_probe((FIXTURES / "probes" / "dual-rtx3090.probe").read_text(), "lab-dual3090")
PLAN = plan_host(DUAL_3090)  # the 70B split 41 | 39 + output over the two 3090s


def understated(plan, mib: int):
    """The same plan with every device's own figures cut to `mib` MiB in all (the deployed flags unchanged)."""
    devices = [d.model_copy(update={"weights_mib": mib, "kv_cache_mib": 0, "compute_mib": 0, "headroom_mib": 0})
               for d in plan.devices]
    return plan.model_copy(update={"devices": devices})


def test_the_load_logs_table_is_read_device_by_device():
    """The --fit pre-pass's table at load (tests/fixtures/llama-server-load-log__rpc-2dev__b11669.txt)."""
    breakdown = parse_memory_breakdown(RPC_LOAD_LOG)
    assert breakdown == MemoryBreakdown(
        devices=(DeviceMemory("RPC0", "127.0.0.1:50100", 180, 31, 90, 59, 24105, 24105, -180),
                 DeviceMemory("RPC1", "127.0.0.1:50101", 203, 60, 90, 53, 24105, 24105, -203)),
        host=DeviceMemory("Host", "", 72, 28, 0, 43),
    )


def test_the_lab_units_start_is_read_and_agrees_with_its_buffer_lines():
    """The deployed unit's journal on lab-dual3090: the table's figures are the buffers llama.cpp then allocates
    (its `model buffer size` lines, truncated to whole MiB)."""
    breakdown = parse_memory_breakdown(START_LOG)
    assert [d.name for d in breakdown.devices] == ["RPC0", "RPC1"] and not breakdown.problems
    assert [d.model_mib for d in breakdown.devices] == [31, 60] and breakdown.host.model_mib == 28
    for device in breakdown.devices:
        assert device.self_mib - (device.model_mib + device.context_mib + device.compute_mib) in (0, 1, 2)
        assert device.total_mib == device.free_mib + device.self_mib + device.unaccounted_mib


def test_the_table_printed_at_stop_is_read_too_and_only_the_first_table_counts():
    stop = parse_memory_breakdown(STOP_LOG)
    assert stop is not None and [d.name for d in stop.devices] == ["RPC0", "RPC1"]
    both = parse_memory_breakdown(START_LOG + STOP_LOG)
    assert both == parse_memory_breakdown(START_LOG)


@pytest.mark.parametrize("log", ["", "llama_server: listening on http://127.0.0.1:8080\n",
                                 "common_memory_breakdown_print: |   - RPC0 (x) | 1 = 1 + ( 0 = 0 + 0 + 0) + 0 |\n"])
def test_a_log_without_a_table_has_no_breakdown(log):
    assert parse_memory_breakdown(log) is None


@pytest.mark.parametrize("row", [
    "|   - RPC0 (127.0.0.1:50100) | 24105 = 24105 + ( 180 = 31 + 90 + ) + -180 |",
    "|   - RPC0 (127.0.0.1:50100) | 24105 = 24105 + ( 1e309 = 31 + 90 + 59) + -180 |",
    "|   - RPC0 (127.0.0.1:50100) | " + "9" * 400 + " = 24105 + ( 180 = 31 + 90 + 59) + -180 |",
    "|   - RPC0 (\x1b[31m) | ²",
    "| garbage",
])
def test_an_unreadable_row_is_named_never_raised(row):
    log = RPC_LOAD_LOG.replace("|   - RPC1 (127.0.0.1:50101) | 24105 = 24105 + ( 203 =    60 +      90 +      53) +        -203 |", row)
    assert log != RPC_LOAD_LOG
    breakdown = parse_memory_breakdown(log)
    assert [d.name for d in breakdown.devices] == ["RPC0"]
    assert len(breakdown.problems) == 1 and "unreadable row" in breakdown.problems[0]
    assert memory_problems(PLAN, breakdown)  # a device it cannot read is not passed as within the plan


# ---------------------------------------------------------------- against the plan


def test_the_rehearsal_stand_in_is_within_the_plan_and_the_summary_pairs_devices():
    plan = rehearse(PLAN)
    breakdown = parse_memory_breakdown(START_LOG)
    assert memory_problems(plan, breakdown) == []
    accounts, unpaired = device_accounts(plan, breakdown)
    assert unpaired == [] and [(a.planned.device.split()[0], a.llama.name) for a in accounts] == [("GPU0", "RPC0"), ("GPU1", "RPC1")]
    gpu0 = plan.devices[0]
    allowed = gpu0.weights_mib + gpu0.kv_cache_mib + gpu0.compute_mib + gpu0.headroom_mib
    assert allowed == gpu0.planned_mib - gpu0.overhead_mib
    assert memory_summary(plan, breakdown).startswith(f"RPC0 (127.0.0.1:50100) {breakdown.devices[0].self_mib:,}/{allowed:,} MiB, RPC1")


def test_a_device_over_its_planned_buffers_and_headroom_fails_at_exactly_one_mib_over():
    breakdown = parse_memory_breakdown(RPC_LOAD_LOG)  # RPC0 holds 180 MiB, RPC1 203
    assert memory_problems(understated(PLAN, 203), breakdown) == []  # at the allowance: within it
    problems = memory_problems(understated(PLAN, 202), breakdown)
    assert len(problems) == 1 and problems[0].startswith(
        "RPC1 (127.0.0.1:50101) holds 203 MiB by llama.cpp's own account (model 60 + context 90 + compute 53), "
        "over the 202 the plan gives GPU1 NVIDIA GeForce RTX 3090 (weights 202 + KV 0 + compute 0 + headroom 0)")
    assert "fix: plan a smaller context or a larger headroom_mib" in problems[0]


def test_the_headroom_is_the_tolerance_the_overhead_is_not():
    breakdown = parse_memory_breakdown(RPC_LOAD_LOG)
    plan = understated(PLAN, 150)
    with_headroom = plan.model_copy(update={"devices": [d.model_copy(update={"headroom_mib": 53}) for d in plan.devices]})
    with_overhead = plan.model_copy(update={"devices": [d.model_copy(update={"overhead_mib": 5000}) for d in plan.devices]})
    assert memory_problems(with_headroom, breakdown) == []
    assert len(memory_problems(with_overhead, breakdown)) == 2


def test_a_device_count_that_differs_from_the_plan_is_named():
    one = parse_memory_breakdown(RPC_LOAD_LOG)
    one = MemoryBreakdown(one.devices[:1], one.host)
    assert memory_problems(PLAN, one) == ["llama-server accounts for 1 device(s) (RPC0), the plan for 2"]


def test_a_pool_head_pairs_its_own_gpus_with_the_last_devices():
    """A head plans only its own GPUs (member_plan: the pool's split, its own devices); llama.cpp lists the workers'
    RPC devices first (src/llama.cpp)."""
    head = PLAN.model_copy(update={"devices": PLAN.devices[1:]})  # the worker holds GPU0's part
    breakdown = parse_memory_breakdown(RPC_LOAD_LOG)
    accounts, unpaired = device_accounts(head, breakdown)
    assert unpaired == [] and [(a.planned.device, a.llama.name) for a in accounts] == [(PLAN.devices[1].device, "RPC1")]
    assert memory_summary(head, breakdown).startswith("RPC1 (127.0.0.1:50101) 203/")
    assert "RPC0 180 MiB (not planned here)" in memory_summary(head, breakdown)
    alone = PLAN.model_copy(update={"devices": PLAN.devices[1:], "tensor_split": None})
    assert device_accounts(alone, breakdown)[1] == ["llama-server accounts for 2 device(s) (RPC0, RPC1), the plan for 1"]


def test_a_cpu_plan_is_judged_on_the_host_row():
    cpu = plan_host(parse_probe((FIXTURES / "probes" / "cpu-16g.probe").read_text(), "lab-cpu"))
    cpu = cpu.model_copy(update={"backend": "llama.cpp"})
    breakdown = parse_memory_breakdown((FIXTURES / "llama-server-buffers__cpu-only__b11669.txt").read_text()
                                       + "common_memory_breakdown_print: | memory breakdown [MiB] | total free self |\n"
                                       + "common_memory_breakdown_print: |   - Host |   295 =  92 + 180 + 22 |\n")
    assert memory_problems(cpu, breakdown) == []
    assert memory_problems(understated(cpu, 294), breakdown)[0].startswith("Host holds 295 MiB")
    assert memory_summary(cpu, breakdown) == f"Host 295/{cpu.devices[0].planned_mib - cpu.devices[0].overhead_mib:,} MiB"


# ---------------------------------------------------------------- shown by status and verify


def test_status_reads_the_section_and_shows_the_account():
    live = parse_status(STATUS_DOC, "lab-dual3090")
    assert live.llama_memory == parse_memory_breakdown(STATUS_DOC)
    assert [d.name for d in live.llama_memory.devices] == ["RPC0", "RPC1"]
    plan = rehearse(plan_host(parse_probe(STATUS_DOC, "lab-dual3090")))
    status = host_status("lab-dual3090", live, plan)
    assert status.llama_memory == memory_summary(plan, live.llama_memory) and status.healthy
    assert status.document()["llama_memory"] == status.llama_memory
    assert f"lab-dual3090: llama.cpp's own account at this start, MiB used/allowed by the plan: {status.llama_memory}" \
        in status_table([status]).splitlines()
    low = host_status("lab-dual3090", live, understated(plan, 30))
    assert not low.healthy and len(low.problems) == 2 and "by llama.cpp's own account" in low.problems[0]


def test_a_status_document_without_the_section_shows_nothing():
    live = parse_status(STATUS_DOC.split("#### r1fleet:status-llama-memory")[0], "lab-dual3090")
    assert live.llama_memory is None
    assert host_status("lab-dual3090", live, rehearse(PLAN)).llama_memory is None


def test_verify_lists_the_account_under_its_table():
    plan = rehearse(PLAN)
    summary = memory_summary(plan, parse_memory_breakdown(START_LOG))
    result = host_result("lab-dual3090", {"memory_as_planned": "passed"}, plan, {"llama_memory": summary})
    table = results_table([result])
    assert f"lab-dual3090: llama.cpp's own account at this start, MiB used/allowed by the plan: {summary}" in table.splitlines()
