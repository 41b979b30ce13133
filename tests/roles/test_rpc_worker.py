"""A pool worker (issue 14) at the operation level on a @fake host: ggml's rpc-server on the worker's pool address,
a firewall that admits the head alone, and the settings that would open it wider refused."""

from __future__ import annotations

import shutil
import subprocess

import facts_for as ff
import pytest
from deploy_harness import rpc_worker_role, run_role
from pool_fixtures import (
    FORKY,
    HEAD_ADDRESS,
    RPC_SERVER,
    SID_CUDA,
    WORKER_ADDRESS,
    device,
    hardware,
    head_config,
    pool_plan,
    worker_config,
)

from r1fleet.errors import R1FleetError
from r1fleet.records import Gpu
from r1fleet.artifacts.pins import Platform
from r1fleet.artifacts.llama_cpp_install import llama_cpp_install
from r1fleet.roles.rpc_worker.role import RpcWorkerRetired
from r1fleet.roles.rpc_worker.decide import (
    RPC_RULES_FILE,
    pool_head_install,
    rpc_worker,
    rpc_worker_install,
)
from r1fleet.operations.stages import apply_roles

UNIT = "/etc/systemd/system/r1fleet-rpc-server.service"
FIREWALL = "/etc/systemd/system/r1fleet-rpc-firewall.service"
# the host as the worker role finds it: its pool address configured, nft present, the package's binary in place
HOST = {"ip -o addr show": ["127.0.0.1", WORKER_ADDRESS, "fe80::1"], "command -v nft": "/usr/sbin/nft",
        **ff.file_exists(RPC_SERVER, mode="-rwxr-xr-x")}


def install_for(settings=None, available=SID_CUDA, platform=FORKY):
    settings = settings or worker_config()
    worker = rpc_worker(pool_plan(), settings, head_config(), hardware("box-b", "GPU-bbbb"))
    base = llama_cpp_install(platform, worker.plan, settings, available)
    return rpc_worker_install(base, platform, worker.plan, settings, available, "big")


def deploy(monkeypatch, settings=None, responses=None, pool=None, hw=None):
    settings = settings or worker_config()
    return run_role(rpc_worker_role, pool or pool_plan(), settings, head_config(), hw or hardware("box-b", "GPU-bbbb"),
                    install_for(), responses={**HOST, **(responses or {})}, monkeypatch=monkeypatch)


def exec_start(unit: str) -> list[str]:
    return next(line for line in unit.splitlines() if line.startswith("ExecStart=")).removeprefix("ExecStart=").split()


def test_the_worker_serves_its_planned_gpu_on_its_pool_address_only(monkeypatch):
    run = deploy(monkeypatch)
    assert not run.failed
    assert run.ran("rpc-server packages", "install libggml0-backend-cuda llama.cpp-tools-extra libggml0-backend-rpc nftables")
    unit = run.uploads[UNIT]
    assert exec_start(unit) == [RPC_SERVER, "-H", WORKER_ADDRESS, "-p", "50052", "-d", "CUDA0"]
    assert 'Environment="CUDA_VISIBLE_DEVICES=GPU-bbbb"' in unit and 'Environment="HOME=/var/lib/ggml-rpc"' in unit
    assert "User=ggml-rpc" in unit and "NoNewPrivileges=yes" in unit and "DeviceAllow=char-nvidia-frontend rw" in unit
    # the unit talks to the head alone, with or without nftables (a `flush ruleset` leaves this filter in place)
    assert "IPAddressDeny=any" in unit and f"IPAddressAllow={HEAD_ADDRESS}\n" in unit
    # it starts only with, and after, the firewall unit
    assert "Requires=r1fleet-rpc-firewall.service\nAfter=r1fleet-rpc-firewall.service\n" in unit
    assert "0.0.0.0" not in unit and "127.0.0.1" not in unit
    # rpc-server exits 0 when it cannot bind (an address that comes up late): restarted anyway, without a limit
    assert "\nRestart=always\n" in unit and "\nStartLimitIntervalSec=0\n" in unit and "StartLimitBurst" not in unit
    # healthy once rpc-server listens on the pool address: the worker's own connection would be dropped
    assert run.ran("Health of r1fleet-rpc-server.service", f"ss -Hltn '( src {WORKER_ADDRESS} and sport = :50052 )'")
    assert run.never_ran(f"/dev/tcp/{WORKER_ADDRESS}/50052")
    # the worker's own solo services are not left holding the GPU
    assert run.op_names.index("RPC worker | Pool big address 192.168.1.32 is this host's") < \
        run.op_names.index("RPC worker | rpc-server packages")


def test_the_firewall_admits_the_head_alone_and_is_loaded_before_rpc_server(monkeypatch):
    run = deploy(monkeypatch)
    rules = run.uploads[RPC_RULES_FILE]
    admit = f"ip saddr {HEAD_ADDRESS} ip daddr {WORKER_ADDRESS} tcp dport 50052 accept"
    assert admit in rules and "tcp dport 50052 counter drop" in rules
    assert rules.index(admit) < rules.index("counter drop")
    assert 'iifname "lo"' not in rules  # this host's users, root included, are dropped like any other peer
    assert "table inet r1fleet-rpc {" in rules and "table inet r1fleet {" not in rules  # the API's table untouched
    firewall = run.uploads[FIREWALL]
    assert "ExecStart=/usr/sbin/nft -f /etc/r1fleet/rpc-nftables.conf" in firewall
    assert "ExecStop=/usr/sbin/nft delete table inet r1fleet-rpc" in firewall
    assert "Before=network-pre.target r1fleet-rpc-server.service" in firewall
    assert "only from the head of pool big (192.168.1.31)" in firewall
    firewall_up = run.commands.index(next(c for c in run.commands if "systemctl start r1fleet-rpc-firewall" in c))
    server_up = run.commands.index(next(c for c in run.commands if "systemctl start r1fleet-rpc-server" in c))
    assert firewall_up < server_up


@pytest.mark.skipif(not shutil.which("nft"), reason="nft not installed (apt-get install nftables)")
@pytest.mark.parametrize("addresses", [(HEAD_ADDRESS, WORKER_ADDRESS), ("fd00::31", "fd00::32")], ids=["ipv4", "ipv6"])
def test_rendered_rules_parse_with_nft(tmp_path, monkeypatch, addresses):
    head, worker = addresses
    run = run_role(rpc_worker_role, pool_plan(), worker_config(address=worker), head_config(address=head),
                   hardware("box-b", "GPU-bbbb"), install_for(), responses={**HOST, "ip -o addr show": [worker]},
                   monkeypatch=monkeypatch)
    rules = tmp_path / "rules.nft"
    rules.write_text(run.uploads[RPC_RULES_FILE])
    assert f"{'ip6' if ':' in head else 'ip'} saddr {head} " in rules.read_text()
    result = subprocess.run(["nft", "-c", "-f", str(rules)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def loaded(rules: str) -> list[str]:
    """`nft list table inet r1fleet-rpc` once `rules` (a rendered rules file) are loaded: the table's block."""
    block = rules[rules.index("table inet r1fleet-rpc {"):]
    return [line.replace("counter drop", "counter packets 0 bytes 0 drop") for line in block.splitlines()]


def converged(first) -> dict:
    """What the worker answers once the deploy has converged it."""
    return {
        **HOST,
        "cat /etc/group": ["root:x:0:", "video:x:44:", "render:x:993:", "ggml-rpc:x:997:"],
        **ff.users(("ggml-rpc", "/var/lib/ggml-rpc", "/usr/sbin/nologin", ["video", "render"])),
        **ff.directory("/var/lib/ggml-rpc", "ggml-rpc", "ggml-rpc", "drwxr-x---"),
        **ff.directory("/etc/r1fleet", "root", "root", "drwx------"),
        **ff.directory("/etc/systemd/system", "root", "root", "drwxr-xr-x"),
        **{k: v for path, text in first.uploads.items() for k, v in ff.file_content(path, text).items()},
        **ff.file_content(RPC_RULES_FILE, first.uploads[RPC_RULES_FILE], mode="-rw-------"),  # root-only
        **ff.running("r1fleet-rpc-firewall.service"),
        **ff.running("r1fleet-rpc-server.service"),
        "nft list table inet r1fleet-rpc": loaded(first.uploads[RPC_RULES_FILE]),
        "dpkg -l": ff.dpkg_installed("libggml0-backend-cuda", "llama.cpp-tools-extra", "libggml0-backend-rpc", "nftables"),
    }


def test_a_second_run_on_a_converged_worker_changes_nothing(monkeypatch):
    first = deploy(monkeypatch)
    again = deploy(monkeypatch, responses=converged(first))
    assert not again.failed and again.changed == []
    assert again.never_ran("systemctl restart") and again.never_ran("systemctl reload") and again.never_ran("ss -Hltn")
    # a table another `flush ruleset` removed is loaded again, and only that
    load = "Reload the RPC firewall unless it holds the planned rules"
    flushed = deploy(monkeypatch, responses={**converged(first), "nft list table inet r1fleet-rpc": ""})
    assert flushed.ran(load, "systemctl reload r1fleet-rpc-firewall.service") and flushed.never_ran("systemctl restart")
    # loaded from other rules (a run cut after writing the file, before its reload: audit M9): reloaded as well
    other = deploy(monkeypatch, pool=pool_plan(rpc_port=50053)).uploads[RPC_RULES_FILE]
    stale = deploy(monkeypatch, responses={**converged(first), "nft list table inet r1fleet-rpc": loaded(other)})
    assert stale.ran(load, "systemctl reload r1fleet-rpc-firewall.service")
    # and its port is not this one: rpc-server, still listening on 50053, is stopped before that port leaves
    assert stale.ran("Stop r1fleet-rpc-server.service while its port changes", "systemctl stop r1fleet-rpc-server.service")


REFUSE = {"exit 1": {"success": False}}


@pytest.mark.parametrize("settings, reason", [
    (dict(address="0.0.0.0"), "is a wildcard"),
    (dict(address="::"), "is a wildcard"),
    (dict(address="127.0.0.1"), "is loopback"),
    (dict(address="box-b.lan"), "is not an IP address"),
    (dict(address=WORKER_ADDRESS, port=50052), "rpc_port 50052 is also the ollama serving port (port) and the llama.cpp serving port"),
    (dict(address=WORKER_ADDRESS, ssh_port=50052), "the SSH port (ssh_port)"),
], ids=["v4-wildcard", "v6-wildcard", "loopback", "dns-name", "serving-port", "ssh-port"])
def test_settings_that_would_open_the_port_wider_fail_the_host(monkeypatch, settings, reason):
    run = run_role(rpc_worker_role, pool_plan(), worker_config(**settings), head_config(), hardware("box-b", "GPU-bbbb"),
                   install_for(), responses={**HOST, **REFUSE}, monkeypatch=monkeypatch)
    assert run.failed and run.ran("Refuse pool big settings", reason) and run.ran("Refuse pool big settings", "pool big") and run.ran("Refuse pool big settings", "host box-b") and run.ran("Refuse pool big settings", "(fix: ")
    assert UNIT not in run.uploads and run.never_ran("apt-get")


@pytest.mark.parametrize("kwargs, reason, where", [
    (dict(head_address="192.168.1.0/24"), "a network of 256 addresses, not one host", "host box-a: field pools.big"),
    (dict(head_address="0.0.0.0"), "is a wildcard", "host box-a: field pools.big"),
    (dict(bind_address="224.0.0.5"), "is a multicast address", "host box-b: field pools.big"),
    (dict(bind_address="fe80::2"), "IPv6 link-local", "host box-b: field pools.big"),
    (dict(head_address="fd00::31"), "two addresses of one IP version", "host box-b: field address"),
])
def test_the_head_must_be_one_host_address(kwargs, reason, where):
    """The error names the host whose setting is wrong (the head's address is the head's)."""
    with pytest.raises(R1FleetError) as error:
        rpc_worker(pool_plan(), worker_config(), head_config(), hardware("box-b", "GPU-bbbb"), **kwargs)
    text = str(error.value)
    assert reason in text and "pool big" in text and text.startswith(where) and "(fix: " in text
    single = rpc_worker(pool_plan(), worker_config(), head_config(), hardware("box-b", "GPU-bbbb"),
                        head_address="192.168.1.31/32")
    assert single.head == HEAD_ADDRESS


def test_a_head_named_by_dns_is_refused():
    with pytest.raises(R1FleetError, match=r"host box-a: field address: pool big: the head box-a's pool address "
                                           r"'box-a.lan' is not an IP address"):
        rpc_worker(pool_plan(), worker_config(), head_config(address="box-a.lan"), hardware("box-b", "GPU-bbbb"))


def test_a_pool_address_the_host_does_not_have_is_refused_before_any_change(monkeypatch):
    run = deploy(monkeypatch, responses={"ip -o addr show": ["127.0.0.1", "10.9.9.9"], **REFUSE})
    assert run.failed and run.ran("Pool big address 192.168.1.32 is this host's", "192.168.1.32 is not an address of this host (it has 10.9.9.9, 127.0.0.1)")
    assert run.never_ran("apt-get") and UNIT not in run.uploads


def test_a_worker_with_two_gpus_serves_both_in_the_plans_order(monkeypatch):
    gpus = [Gpu(index=i, vendor="nvidia", name="NVIDIA GeForce RTX 3090", memory_total_mib=24576, uuid=f"GPU-b{i}",
                compute_cap="8.6", source="nvidia-smi-query") for i in (0, 1)]
    hw = hardware("box-b", "GPU-b0").model_copy(update={"gpus": gpus})
    pool = pool_plan(tensor_split=[27, 27, 26], devices=[
        device("box-b", "GPU-b0", 27, True, 0), device("box-b", "GPU-b1", 27, True, 1),
        device("box-a", "GPU-aaaa", 26, False, output=True)])
    run = deploy(monkeypatch, pool=pool, hw=hw)
    unit = run.uploads[UNIT]
    assert exec_start(unit)[-2:] == ["-d", "CUDA0,CUDA1"]
    assert 'Environment="CUDA_VISIBLE_DEVICES=GPU-b0,GPU-b1"' in unit


def test_a_lab_worker_serves_its_cpu_stand_in():
    settings = worker_config(profile="single-rtx3090", rehearsal=True)
    worker = rpc_worker(pool_plan(), settings, head_config(), hardware("box-b", "GPU-bbbb"))
    assert worker.devices == ()  # rpc-server falls back to its CPU device (tools/rpc/rpc-server.cpp, get_devices)
    install = install_for(settings, available={"llama.cpp-tools", "llama.cpp-tools-extra", "libggml0-backend-rpc"})
    assert install.packages == ("llama.cpp-tools-extra", "libggml0-backend-rpc")


BOOKWORM = Platform(arch="amd64", distro_id="debian", codename="bookworm", tegra_major=None)


@pytest.mark.parametrize("platform, available, settings, reason", [
    (BOOKWORM, set(), {}, "box-b runs debian bookworm: a pool's rpc-server and RPC backend come from Debian forky or sid's "
                          "packages alone (the Ollama archive has neither)"),
    (FORKY, {"llama.cpp-tools", "llama.cpp-tools-extra", "libggml0-backend-rpc"}, {},
     "apt on box-b offers no libggml0-backend-cuda (libggml0-backend-cuda is in Debian sid's contrib alone)"),
    (FORKY, SID_CUDA, {"llama_cpp_install": "source"}, "box-b's source build"),
    (FORKY, {"llama.cpp-tools", "libggml0-backend-cuda"}, {}, "offers no llama.cpp-tools-extra, libggml0-backend-rpc"),
    (FORKY, {"llama.cpp-tools"}, {"llama_cpp_install": "package"},
     "offers no llama.cpp-tools-extra, libggml0-backend-rpc, libggml0-backend-cuda"),
], ids=["bookworm", "forky-without-cuda", "source", "no-rpc-packages", "package-without-cuda"])
def test_a_llama_cpp_source_without_rpc_server_is_refused_with_the_fix(platform, available, settings, reason):
    with pytest.raises(R1FleetError) as error:
        install_for(worker_config(**settings), available=available, platform=platform)
    text = str(error.value)
    assert "host box-b" in text and "pool big" in text and reason in text
    assert "take box-b out of pool big" in text


def test_the_head_gets_the_rpc_backend_or_is_refused():
    worker = rpc_worker(pool_plan(), worker_config(), head_config(), hardware("box-b", "GPU-bbbb"))
    base = llama_cpp_install(FORKY, worker.plan, head_config(), SID_CUDA)
    head = pool_head_install(base, FORKY, worker.plan, head_config(), SID_CUDA, "big")
    assert head.packages == ("llama.cpp-tools", "libggml0-backend-cuda", "libggml0-backend-rpc")
    assert head.binary == "/usr/bin/llama-server"
    bundle = llama_cpp_install(BOOKWORM, worker.plan, head_config(), set())
    with pytest.raises(R1FleetError, match="offers no llama.cpp-tools, libggml0-backend-rpc, libggml0-backend-cuda"):
        pool_head_install(bundle, FORKY, worker.plan, head_config(), set(), "big")
    with pytest.raises(R1FleetError, match="llama.cpp would come from ollama-bundle here"):
        pool_head_install(bundle, FORKY, worker.plan, head_config(), SID_CUDA, "big")


def test_a_former_worker_is_retired(monkeypatch):
    present = {**ff.file_exists(UNIT), **ff.file_exists(FIREWALL), **ff.file_exists(RPC_RULES_FILE),
               **ff.running("r1fleet-rpc-server.service"), **ff.running("r1fleet-rpc-firewall.service")}
    run = run_role(lambda: apply_roles([RpcWorkerRetired()]), responses=present, monkeypatch=monkeypatch)
    stop_server = run.commands.index("systemctl stop r1fleet-rpc-server.service")
    assert stop_server < run.commands.index("systemctl stop r1fleet-rpc-firewall.service")
    assert run.ran("Remove r1fleet-rpc-server.service", f"rm -f {UNIT}")
    assert run.ran("Remove the RPC firewall unit", f"rm -f {FIREWALL}")
    assert run.ran("Remove the RPC firewall rules", f"rm -f {RPC_RULES_FILE}")
    clean = run_role(lambda: apply_roles([RpcWorkerRetired()]), monkeypatch=monkeypatch)
    assert clean.never_ran("systemctl stop") and clean.never_ran("rm -f")
