"""What each host serves (r1fleet/lock/served.py): the one answer the deploy, verify and the lock share, from the
fleet, the lock and the hardware (the shipped probes)."""

from __future__ import annotations

from pathlib import Path

from r1fleet.fleet.config import HostConfig
from r1fleet.hardware import parse_probe
from r1fleet.lock.file import Lock
from r1fleet.lock.match import LockMismatch, lock_entry
from r1fleet.lock.served import served_plans
from r1fleet.plan.planner import plan_host
from r1fleet.plan.policy import Policy
from r1fleet.plan.pool_settings import PoolSettings
from r1fleet.plan.pools import plan_members

from test_pools import BOX_A, BOX_B, on_sid

PROBES = Path(__file__).resolve().parents[1] / "fixtures" / "probes"


def hardware(name: str, text: str | None = None):
    return parse_probe(text if text is not None else (PROBES / f"{name}.probe").read_text(), name)


def config(name: str, **settings) -> HostConfig:
    return HostConfig(**{"name": name, "address": "192.168.1.10", **settings})


def test_a_host_alone_serves_todays_plan_without_a_lock_and_the_locked_one_with_it():
    hw = {"rtx4090": hardware("rtx4090"), "cpu-16g": hardware("cpu-16g")}
    short = Policy(min_context=2048, max_context=4096)
    hosts = {"rtx4090": config("rtx4090"), "cpu-16g": config("cpu-16g", policy=short)}
    today = served_plans(hosts, {}, None, hw)
    assert today["rtx4090"].plan == plan_host(hw["rtx4090"], Policy()) and not today["rtx4090"].locked
    assert today["cpu-16g"].plan == plan_host(hw["cpu-16g"], short) != plan_host(hw["cpu-16g"], Policy())
    # locked with another policy: the lock's plan is served, exactly, until relocked
    loose = plan_host(hw["rtx4090"], Policy(min_context=2048, max_context=4096))
    lock = Lock(hosts={"rtx4090": lock_entry("rtx4090", hw["rtx4090"], loose)})
    served = served_plans(hosts, {}, lock, hw)
    assert served["rtx4090"].plan == loose and served["rtx4090"].locked and served["rtx4090"].role == "alone"
    assert served["cpu-16g"].plan == today["cpu-16g"].plan and not served["cpu-16g"].locked


def test_changed_hardware_fails_that_host_alone():
    hw = {"rtx4090": hardware("rtx4090"), "rtx3060-12g": hardware("rtx3060-12g")}
    hosts = {name: config(name) for name in hw}
    before = hardware("rtx4090", (PROBES / "rtx3060-12g.probe").read_text())  # locked when it held a 3060
    lock = Lock(hosts={"rtx4090": lock_entry("rtx4090", before, plan_host(before, Policy()))})
    served = served_plans(hosts, {}, lock, hw, fleet="inventory/fleet.yml")
    assert isinstance(served["rtx4090"], LockMismatch)
    assert "r1fleet lock --fleet inventory/fleet.yml rtx4090" in str(served["rtx4090"])
    assert served["rtx3060-12g"].plan == plan_host(hw["rtx3060-12g"], Policy())


def test_rehearsal_serves_the_stand_in_in_the_planned_slot():
    hw = {"dual-rtx3090": hardware("dual-rtx3090")}
    planned = plan_host(hw["dual-rtx3090"], Policy())
    for hosts, run_rehearsal in (({"dual-rtx3090": config("dual-rtx3090", rehearsal=True)}, False),
                                 ({"dual-rtx3090": config("dual-rtx3090")}, True)):
        plan = served_plans(hosts, {}, None, hw, rehearsal=run_rehearsal)["dual-rtx3090"].plan
        assert plan.rehearsal and plan.target_model == planned.model and plan.model != planned.model
        assert (plan.backend, plan.placement, plan.gpu_indices) == (planned.backend, planned.placement, planned.gpu_indices)
    assert not served_plans({"dual-rtx3090": config("dual-rtx3090")}, {}, None, hw)["dual-rtx3090"].plan.rehearsal


def test_pool_members_serve_their_part_and_only_the_head_is_rehearsed():
    hw = {"box-a": hardware("box-a", on_sid(BOX_A)), "box-b": hardware("box-b", on_sid(BOX_B)), "rtx4090": hardware("rtx4090")}
    pool = PoolSettings(hosts=["box-a", "box-b"], head="box-a")
    hosts = {"box-a": config("box-a", rehearsal=True), "box-b": config("box-b", address="192.168.1.11", rehearsal=True),
             "rtx4090": config("rtx4090")}
    served = served_plans(hosts, {"big": pool}, None, hw)
    head, worker = served["box-a"], served["box-b"]
    expected = plan_members("big", pool, [hw["box-a"], hw["box-b"]], [Policy(), Policy()])
    assert expected.pooled and head.pool == expected and worker.pool == expected
    assert (head.role, worker.role) == ("head", "worker") and served["rtx4090"].role == "alone"
    assert head.plan.rehearsal and head.plan.target_model == expected.model and head.plan.tensor_split
    assert not worker.plan.rehearsal and worker.plan.gguf is None and worker.plan.tensor_split is None
    # the lock's pool plan is served while both members match it
    lock = Lock(hosts={m: lock_entry(m, hw[m], plan_host(hw[m], Policy())) for m in ("box-a", "box-b")},
                pools={"big": expected.model_copy(update={"context_length": 4096})})
    locked = served_plans(hosts, {"big": pool}, lock, hw)
    assert locked["box-a"].locked and locked["box-a"].pool.context_length == 4096


def test_a_pool_member_not_probed_leaves_the_others_alone():
    hw = {"box-a": hardware("box-a", BOX_A)}
    pool = PoolSettings(hosts=["box-a", "box-b"], head="box-a")
    served = served_plans({"box-a": config("box-a"), "box-b": config("box-b")}, {"big": pool}, None, hw)
    assert set(served) == {"box-a"} and served["box-a"].role == "alone"
