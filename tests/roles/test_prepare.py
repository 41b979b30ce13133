"""Every role is prepared the same way, from one HostContext (r1fleet/operations/stages.py), and decides for
itself: which release, which install, which download, which exposure. Real probes, real pins."""

from __future__ import annotations

from pathlib import Path

import pytest
from pool_fixtures import SID_CUDA, hardware, head_config, pool_plan, worker_config

from r1fleet.artifacts.llama_cpp_install import apt_offer
from r1fleet.artifacts.pins import platform_from_hardware
from r1fleet.deploy.refusals import PREPARED, check_before_change, deploy_refusal
from r1fleet.deploy.serve import ROLES
from r1fleet.errors import DeployError, R1FleetError
from r1fleet.fleet.config import HostConfig, OllamaReleaseOverride
from r1fleet.hardware import parse_probe
from r1fleet.lock.served import served_alone, served_in_pool
from r1fleet.operations.stages import HostContext
from r1fleet.plan.catalog import load_catalog
from r1fleet.records import LlamaCppApt, OsInfo
from r1fleet.roles.exposure.role import ExposureRole
from r1fleet.roles.gpu_driver.role import DriverRole
from r1fleet.roles.macos.role import MacOllamaRole
from r1fleet.roles.ollama.role import OllamaRole
from r1fleet.roles.rpc_worker.decide import pool_install

PROBES = Path(__file__).resolve().parents[1] / "fixtures" / "probes"
MIRROR = "http://192.168.1.5:8088"  # a fleet's artifact mirror (not the lab's): it serves the pinned bytes


def context(probe: str, **settings) -> HostContext:
    config = HostConfig(**{"name": probe, "address": "192.168.1.21", **settings})
    hw = parse_probe((PROBES / f"{probe}.probe").read_text(), probe)
    return HostContext(config, hw, served_alone(config, hw, None))


def test_every_kind_of_host_has_its_roles_in_stage_order():
    assert [r.__name__ for r in ROLES["ollama"]] == ["RpcWorkerRetired", "DriverRole", "ExposureRole", "OllamaRole"]
    assert [r.__name__ for r in ROLES["worker"]] == ["DriverRole", "ExposureRole", "RpcWorkerRole"]
    for kind, roles in ROLES.items():
        if "ExposureRole" in [r.__name__ for r in roles]:  # the firewall is up before any backend starts
            names = [r.__name__ for r in roles]
            assert names.index("ExposureRole") < len(names) - 1, kind


def test_the_ollama_role_picks_its_pinned_release_and_downloads_a_gguf_only_to_import_a_stand_in():
    ctx = context("rtx3060-12g")
    role = OllamaRole.prepare(ctx)
    assert ctx.plan.backend == "ollama" and role.download is None
    assert [a.name for a in role.release.assets] == ["ollama-linux-amd64.tar.zst"] and role.release.version == "0.32.9"
    rehearsal = OllamaRole.prepare(context("rtx3060-12g", rehearsal=True, mirror=MIRROR))
    stand_in = load_catalog().stand_ins[0].gguf
    assert rehearsal.download is not None and rehearsal.download.sha256 == stand_in.sha256
    from_registry = OllamaRole.prepare(context("rtx3060-12g", rehearsal=True, mirror=MIRROR,
                                               ollama_registry="https://registry.lan"))
    assert from_registry.download is None  # a registry that serves the stand-in: nothing to import


def test_a_mac_downloads_only_the_stand_in_it_imports():
    assert MacOllamaRole.prepare(context("mac-studio-64g")).download is None
    assert MacOllamaRole.prepare(context("mac-studio-64g", rehearsal=True, mirror=MIRROR)).download is not None


def test_a_worker_is_never_exposed_and_a_host_alone_keeps_its_listen():
    exposed = dict(listen="192.168.1.21", allow=["192.168.1.0/24"])
    alone = context("rtx4090", **exposed)
    assert ExposureRole.prepare(alone).entry.listen == "192.168.1.21"
    settings = worker_config(**exposed)
    ctx = HostContext(settings, hardware("box-b", "GPU-bbbb"),
                      served_in_pool(settings, hardware("box-b", "GPU-bbbb"), pool_plan(), locked=False),
                      {"box-a": head_config(), "box-b": settings})
    role = ExposureRole.prepare(ctx)
    assert ctx.served.role == "worker" and role.entry.listen is None and role.entry.allow == []


def test_the_driver_role_takes_the_hosts_hardware_and_plan():
    ctx = context("dual-rtx3090")
    role = DriverRole.prepare(ctx)
    assert role.hw is ctx.hardware and role.plan is ctx.plan


def test_a_host_not_run_by_systemd_is_refused_before_any_change_and_local_is_this_machine():
    """pyinfra's @local (the machine the deploy runs on) needs no fleet file; a Docker container, whose PID 1
    is not systemd, is refused with the reason instead of failing at the first unit."""
    probe = (PROBES / "rtx3060-12g.probe").read_text()
    config = HostConfig.from_host_data("@local", {})
    assert config.address == "127.0.0.1"
    for init, refused in (("systemd", False), ("bash", True), ("", False)):
        hw = parse_probe(probe.replace("#### r1fleet:meminfo", f"#### r1fleet:init\n{init}\n#### r1fleet:meminfo"), "@local")
        assert hw.os.init == init
        ctx = HostContext(config, hw, served_alone(config, hw, None))
        if refused:
            with pytest.raises(DeployError, match="its PID 1 is bash"):
                check_before_change(ctx.served, config, hw)
        else:
            check_before_change(ctx.served, config, hw)


def test_the_plan_marks_a_host_with_the_refusal_its_roles_raise_when_prepared():
    """r1fleet/deploy/refusals.py calls the decisions the roles' prepare calls: one table of kinds, the same errors."""
    assert set(PREPARED) == set(ROLES)
    ctx = context("jetson-orin-64g")
    with pytest.raises(R1FleetError) as prepared:
        OllamaRole.prepare(ctx)
    refusal = deploy_refusal(ctx.served, ctx.settings, ctx.hardware)
    assert refusal is not None and str(refusal) == str(prepared.value)
    pinned = HostConfig(name="jetson-orin-64g", address="192.168.1.21",
                        ollama_release=OllamaReleaseOverride(sha256={"ollama-linux-arm64-jetpack6.tar.zst": "e" * 64}))
    ctx = HostContext(pinned, ctx.hardware, ctx.served)
    assert OllamaRole.prepare(ctx).release and deploy_refusal(ctx.served, ctx.settings, ctx.hardware) is None
    assert deploy_refusal(context("rtx4090").served, context("rtx4090").settings, context("rtx4090").hardware) is None


def test_a_pool_member_is_refused_as_its_role_would_refuse_it():
    """On Ubuntu (apt offers no llama.cpp packages) both members' llama.cpp would be the Ollama archive's, and on
    forky/sid with apt lists never read NVIDIA's backend is not taken to be there (sid's contrib alone): the head's
    and the worker's prepare refuse them, and so does the plan; on sid whose apt offers them (the probe read its
    lists) neither."""
    ubuntu = OsInfo(arch="x86_64", id="ubuntu", codename="noble", version_id="24.04")
    members = {"box-a": head_config(), "box-b": worker_config()}
    sid_apt = LlamaCppApt(lists=True, candidates={package: "1.0-1" for package in SID_CUDA})
    for role, name, uuid in (("head", "box-a", "GPU-aaaa"), ("worker", "box-b", "GPU-bbbb")):
        forky_hw = hardware(name, uuid)
        sid_hw = forky_hw.model_copy(update={"llama_cpp_apt": sid_apt})
        for hw, refused in ((sid_hw, False), (forky_hw, True), (sid_hw.model_copy(update={"os": ubuntu, "llama_cpp_apt": None}), True)):
            served = served_in_pool(members[name], hw, pool_plan(), locked=False)
            refusal = deploy_refusal(served, members[name], hw, members)
            assert (refusal is not None) == refused, (role, hw.os.id, refusal)
            if refused:
                with pytest.raises(R1FleetError) as prepared:
                    pool_install(served.plan, members[name], platform_from_hardware(hw), apt_offer(hw), "big", role)
                assert str(refusal) == str(prepared.value)


def test_the_deploy_says_when_it_serves_the_lock_instead_of_todays_plan(tmp_path, monkeypatch, capsys):
    """A model pinned (here by --data) after locking: the deploy serves the locked plan, and says what today's would
    change and how to take it, as `r1fleet plan` does."""
    from types import SimpleNamespace

    from r1fleet.deploy import serve
    from r1fleet.lock.match import Lock, lock_entry, write_lock

    fleet = tmp_path / "fleet.yml"
    fleet.write_text("hosts:\n  desk: {address: 192.168.1.22}\n")
    hw = parse_probe((PROBES / "rtx4090.probe").read_text(), "desk")
    locked = lock_entry("desk", hw, served_alone(HostConfig(name="desk", address="192.168.1.22"), hw, None).plan)
    write_lock(tmp_path / "fleet.yml.lock", Lock(hosts={"desk": locked}))
    data = {"r1fleet_fleet": str(fleet), "model": "14b"}
    monkeypatch.setattr(serve, "host", SimpleNamespace(name="desk", data=data))
    ctx = serve.host_context(HostConfig.from_host_data("desk", data), hw)
    assert ctx.plan == locked.plan and ctx.served.locked
    printed = capsys.readouterr().out
    assert ("[desk]   served from the fleet lock, not today's plan, which would change model: deepseek-r1-distill-qwen-32b "
            "-> deepseek-r1-distill-qwen-14b") in printed
    assert f"(to serve today's plan: `r1fleet lock --fleet {fleet} desk`)" in printed
