"""One llama.cpp version across a pool (issue 23 item 6): the members agree on one ggml and one llama.cpp version
(the lock's, else the one all have installed, else the one apt offers all), install exactly those, and each
member's unit checks before every start that it still has them; a disagreement is refused naming the members and
their versions.

Test double (header rule): dpkg-query, for the start check run as bash runs it, is a shell script answering with a
version (the dpkg database of a Debian host is what it reads there)."""

from __future__ import annotations

import subprocess

import pytest
from deploy_harness import run_role
from pool_fixtures import RPC_SERVER, WORKER_ADDRESS, hardware, head_config, pool_plan, worker_config

from r1fleet.errors import R1FleetError
from r1fleet.lock.served import served_in_pool
from r1fleet.operations.stages import HostContext, apply_roles
from r1fleet.roles.rpc_worker.decide import pinned, pool_versions, version_check
from r1fleet.roles.llama_cpp.role import LlamaCppRole
from r1fleet.roles.rpc_worker.role import RpcWorkerRole

GGML, LLAMA = "0.9.4-1", "1:0.7.0+dfsg-2"
UNIT = "/etc/systemd/system/r1fleet-rpc-server.service"
HEAD_UNIT = "/etc/systemd/system/r1fleet-llama-server.service"


def offer(ggml=(None, GGML), llama=(None, LLAMA), role="worker"):
    tools = "llama.cpp-tools" if role == "head" else "llama.cpp-tools-extra"
    return {"libggml0-backend-rpc": ggml, tools: llama}


def test_members_with_one_candidate_install_it():
    assert pool_versions(pool_plan(), {"box-a": offer(role="head"), "box-b": offer()}) == {"ggml": GGML, "llama.cpp": LLAMA}


def test_what_every_member_has_installed_is_kept_over_a_newer_candidate():
    kept = {"box-a": offer(ggml=(GGML, "0.9.5-1"), role="head"), "box-b": offer(ggml=(GGML, "0.9.5-1"))}
    assert pool_versions(pool_plan(), kept)["ggml"] == GGML


def test_members_that_would_run_different_versions_are_refused_naming_each():
    skewed = {"box-a": offer(ggml=(None, "0.9.5-1"), role="head"), "box-b": offer(ggml=(GGML, GGML))}
    with pytest.raises(R1FleetError) as refused:
        pool_versions(pool_plan(), skewed)
    said = str(refused.value)
    assert "pool big: the members would run different ggml versions (box-a has none, apt offers 0.9.5-1; box-b has 0.9.4-1)" in said
    assert "box-a, box-b" in said and "apt-get update" in said


def test_the_locked_version_is_installed_or_the_member_is_refused():
    locked = pool_plan(llama_cpp_versions={"ggml": GGML, "llama.cpp": LLAMA})
    newer = {"box-a": offer(ggml=(GGML, "0.9.5-1"), role="head"), "box-b": offer(ggml=(None, "0.9.5-1"))}
    with pytest.raises(R1FleetError, match=r"host box-b: .*the lock runs the pool on ggml 0\.9\.4-1, which box-b cannot install"):
        pool_versions(locked, newer)
    both = {"box-a": offer(ggml=(GGML, "0.9.5-1"), role="head"), "box-b": offer(ggml=("0.9.5-1", GGML))}
    assert pool_versions(locked, both) == {"ggml": GGML, "llama.cpp": LLAMA}


def test_the_packages_the_pool_agrees_on_are_pinned_and_no_other():
    versions = {"ggml": GGML, "llama.cpp": LLAMA}
    assert pinned(("libggml0-backend-cuda", "llama.cpp-tools-extra", "libggml0-backend-rpc", "nftables"), versions) == (
        "libggml0-backend-cuda", f"llama.cpp-tools-extra={LLAMA}", f"libggml0-backend-rpc={GGML}", "nftables")
    assert pinned(("llama.cpp-tools",), {}) == ("llama.cpp-tools",)


def start_check(tmp_path, installed: dict[str, str]) -> subprocess.CompletedProcess:
    fake = tmp_path / "dpkg-query"
    fake.write_text("#!/bin/sh\n# a stand-in for dpkg-query -W -f='${Version}' PKG (see this module's header)\n"
                    + "".join(f'[ "$3" = {p} ] && printf %s {v!r} && exit 0\n' for p, v in installed.items()) + "exit 1\n")
    fake.chmod(0o755)
    script = version_check("big", "box-b", "worker", {"ggml": GGML, "llama.cpp": LLAMA})
    return subprocess.run(["/bin/bash", "-c", script], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin"})


def test_the_start_check_passes_on_the_pools_versions_and_names_an_upgraded_package(tmp_path):
    ok = start_check(tmp_path, {"libggml0-backend-rpc": GGML, "llama.cpp-tools-extra": LLAMA})
    assert ok.returncode == 0, ok.stderr
    upgraded = start_check(tmp_path, {"libggml0-backend-rpc": "0.9.5-1", "llama.cpp-tools-extra": LLAMA})
    assert upgraded.returncode == 1
    assert upgraded.stderr.startswith("r1fleet: pool big: box-b has libggml0-backend-rpc 0.9.5-1, the pool runs ggml "
                                      "0.9.4-1 on every member")
    gone = start_check(tmp_path, {"libggml0-backend-rpc": GGML})
    assert gone.returncode == 1 and "box-b has llama.cpp-tools-extra none, the pool runs llama.cpp 1:0.7.0+dfsg-2" in gone.stderr


def apt_policy(packages: dict[str, str]) -> list[str]:
    lines = []
    for name, candidate in packages.items():
        lines += [f"{name}:", "  Installed: (none)", f"  Candidate: {candidate}", "  Version table:"]
    return lines


# sid with contrib: every llama.cpp package r1fleet asks apt about, at the pool's versions
SID_APT = apt_policy({"llama.cpp-tools": LLAMA, "libggml0-backend-cuda": GGML, "llama.cpp-tools-extra": LLAMA,
                      "libggml0-backend-rpc": GGML, "libggml0-backend-hip": GGML, "libggml0-backend-vulkan": GGML})


def member_context(host: str, uuid: str) -> HostContext:
    """A member of pool big prepared as the deploy prepares it: both members' apt offering the same versions."""
    members = {"box-a": head_config(), "box-b": worker_config()}
    hw = hardware(host, uuid)
    return HostContext(members[host], hw, served_in_pool(members[host], hw, pool_plan(), locked=False), members,
                       {"box-a": offer(role="head"), "box-b": offer()})


def prepared_worker(ctx: HostContext) -> None:
    apply_roles([RpcWorkerRole.prepare(ctx)])


def test_a_worker_installs_the_pools_versions_and_checks_them_before_each_start(monkeypatch):
    run = run_role(prepared_worker, member_context("box-b", "GPU-bbbb"), monkeypatch=monkeypatch, responses={
        "apt-cache policy": SID_APT, "ip -o addr show": ["127.0.0.1", WORKER_ADDRESS],
        "command -v nft": "/usr/sbin/nft", f"-e {RPC_SERVER}": "True"})
    assert run.ran("rpc-server packages", f"libggml0-backend-cuda llama.cpp-tools-extra={LLAMA} "
                                          f"libggml0-backend-rpc={GGML} nftables")
    pre = next(line for line in run.uploads[UNIT].splitlines() if line.startswith("ExecStartPre=/bin/bash"))
    assert "dpkg-query -W -f=" in pre and "libggml0-backend-rpc" in pre and "box-b has" in pre


def prepared_head(ctx: HostContext) -> None:
    apply_roles([LlamaCppRole.prepare(ctx)])


def test_the_head_installs_the_pools_versions_and_checks_them_before_each_start(monkeypatch):
    run = run_role(prepared_head, member_context("box-a", "GPU-aaaa"), monkeypatch=monkeypatch,
                   responses={"apt-cache policy": SID_APT})
    assert run.ran("llama.cpp packages", f"llama.cpp-tools={LLAMA} libggml0-backend-cuda libggml0-backend-rpc={GGML}")
    pre = next(line for line in run.uploads[HEAD_UNIT].splitlines() if line.startswith("ExecStartPre=/bin/bash"))
    # the version first, then the wait for the workers and their devices
    assert pre.index("dpkg-query") < pre.index("/dev/tcp/") < pre.index("--list-devices")
    assert "box-a has" in pre and "llama.cpp-tools" in pre
