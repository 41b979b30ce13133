"""A pool's head (issue 14): llama-server with --rpc to its workers and the split over every device in llama.cpp's
order, a unit that waits for the workers, and a health step that names a worker that is down."""

from __future__ import annotations

import facts_for as ff
import pytest
from deploy_harness import run_role
from pool_fixtures import FORKY, HEAD_ADDRESS, SID_CUDA, WORKER_ADDRESS, device, hardware, head_config, pool_plan, worker_config

from r1fleet.fleet.config import HostConfig
from r1fleet.errors import R1FleetError
from r1fleet.artifacts.pins import Download
from r1fleet.roles.llama_cpp.role import LlamaCppRole
from r1fleet.artifacts.llama_cpp_install import llama_cpp_install
from r1fleet.roles.llama_cpp.decide import llama_server_args
from r1fleet.roles.llama_cpp.pool import PoolHead, load_seconds, pool_head, pool_server_args
from r1fleet.roles.rpc_worker.decide import pool_head_install
from r1fleet.operations.stages import apply_roles
from r1fleet.lock.served import served_in_pool
from r1fleet.tensor_split import placed_blocks

UNIT = "/etc/systemd/system/r1fleet-llama-server.service"
MODEL = "/var/lib/r1fleet/models/llama.cpp/70b.gguf"
DOWNLOAD = Download(name="70b.gguf", url="https://example.invalid/70b.gguf", sha256="d" * 64)


def head(pool=None, settings=None, workers=None) -> PoolHead:
    pool = pool or pool_plan()
    settings = settings or head_config()
    served = served_in_pool(settings, hardware("box-a", "GPU-aaaa"), pool, locked=False)
    return pool_head(pool, settings, served.plan, {"box-b": worker_config()} if workers is None else workers)


def three_hosts():
    """Two workers listed c before b: --rpc follows the pool's order, and so does the split."""
    pool = pool_plan(workers=["box-c", "box-b"], tensor_split=[27, 27, 26], devices=[
        device("box-c", "GPU-cccc", 27, True), device("box-b", "GPU-bbbb", 27, True),
        device("box-a", "GPU-aaaa", 26, False, output=True)])
    workers = {"box-b": worker_config(), "box-c": HostConfig(name="box-c", address="192.168.1.33")}
    return pool, head(pool, workers=workers)


def test_the_head_adds_rpc_and_the_pools_split_to_the_single_host_arguments():
    h = head()
    args = pool_server_args(h, head_config(), MODEL, None)
    assert args[args.index("--rpc") + 1] == f"{WORKER_ADDRESS}:50052"
    assert args[args.index("--tensor-split") + 1] == "41,40"  # PoolPlan.tensor_split_flag: 41 | 39 + output
    assert args.index("--rpc") < args.index("--tensor-split")
    assert placed_blocks([41, 40], n_layer=80) == [41, 39]
    # everything else is the single-host llama-server's, for the head's plan
    rest = args[:args.index("--rpc")] + args[args.index("--rpc") + 2:]
    assert rest == llama_server_args(h.plan, head_config(), MODEL, None)
    # the head's own GPU only: CUDA_VISIBLE_DEVICES and the driver see box-a's GPU, not the worker's
    assert h.plan.gpu_uuids == ["GPU-aaaa"] and h.plan.host == "box-a" and h.plan.tensor_split == [41, 39]


def test_workers_are_listed_in_the_pools_order():
    pool, h = three_hosts()
    args = pool_server_args(h, head_config(), MODEL, None)
    assert args[args.index("--rpc") + 1] == "192.168.1.33:50052,192.168.1.32:50052"
    assert args[args.index("--tensor-split") + 1] == ",".join(map(str, pool.tensor_split_flag))


def test_a_lab_head_lists_its_own_gpu_stand_ins_after_the_workers():
    settings = head_config(profile="single-rtx3090", rehearsal=True)
    h = head(settings=settings)
    rpc = pool_server_args(h, settings, MODEL, None)
    assert rpc[rpc.index("--rpc") + 1].startswith(f"{WORKER_ADDRESS}:50052,127.0.0.1:")


def test_a_worker_without_an_ip_address_or_settings_is_refused():
    with pytest.raises(R1FleetError, match=r"host box-b: field address: pool big: .*'box-b.lan' is not an IP address"):
        head(workers={"box-b": worker_config(address="box-b.lan")})
    with pytest.raises(R1FleetError, match="no settings for worker box-b"):
        head(workers={})
    with pytest.raises(R1FleetError, match="is not the head of a pooled pool"):
        head(pool=pool_plan(pooled=False))


def head_role(plan, settings, install, download, pool):
    apply_roles([LlamaCppRole(plan, settings, install, download, pool=pool)])


def deploy(monkeypatch, settings=None, responses=None):
    settings = settings or head_config()
    h = head(settings=settings)
    base = llama_cpp_install(FORKY, h.plan, settings, SID_CUDA)
    install = pool_head_install(base, FORKY, h.plan, settings, SID_CUDA, "big")
    return run_role(head_role, h.plan, settings, install, DOWNLOAD, h, responses=responses, monkeypatch=monkeypatch)


def unit_line(unit: str, key: str) -> str:
    return next(line for line in unit.splitlines() if line.startswith(key)).removeprefix(key)


def test_the_head_unit_waits_for_its_workers_and_may_reach_them(monkeypatch):
    run = deploy(monkeypatch)
    assert not run.failed
    assert run.ran("llama.cpp packages", "install curl ca-certificates llama.cpp-tools libggml0-backend-cuda libggml0-backend-rpc")
    unit = run.uploads[UNIT]
    args = unit_line(unit, "ExecStart=").split()
    assert args[args.index("--rpc") + 1] == f"{WORKER_ADDRESS}:50052" and "--tensor-split" in args
    pre = unit_line(unit, "ExecStartPre=/bin/bash -c ")
    # one systemd word: `%` and `$` doubled so that bash gets `date +%s` and `$end` (systemd.service, Command lines)
    assert pre.startswith('"end=$$(($$(date +%%s)+120)); until timeout 2 bash -c ') and pre.endswith('exit 1; }"')
    assert f"</dev/tcp/{WORKER_ADDRESS}/50052" in pre and "worker box-b (192.168.1.32:50052) did not accept" in pre
    # then each worker's devices, asked with the unit's own llama-server (tests/roles/test_pool_devices.py runs it)
    assert "/usr/bin/llama-server --rpc 192.168.1.32:50052 --list-devices" in pre
    assert "TimeoutStartSec=210" in unit  # 120 s of wait, 30 s for the worker's device check and 30 for the head's GPUs, 30 s
    # IPAddressDeny=any also covers the unit's own connections: the workers are allowed, nothing else is added
    assert f"IPAddressAllow=localhost {WORKER_ADDRESS}\n" in unit
    # the deploy checks the workers from the head before it (re)starts the service, and names a missing one
    check = next(i for i, n in enumerate(run.op_names) if n.endswith("RPC workers of pool big"))
    assert check < next(i for i, n in enumerate(run.op_names) if "Restart r1fleet-llama-server" in n)
    # the health gate allows for the workers' weights crossing the 1 Gbit/s link
    assert load_seconds(pool_plan()) == 210  # 20,000 MiB x 1.25 at 1 Gbit/s
    assert run.ran("Health of r1fleet-llama-server.service", "while [ $i -lt 756 ]")  # 120 s + 42.5 GB read at 100 MB/s (426 s) + 210 s


def test_an_exposed_head_keeps_its_allow_list_and_adds_the_workers(monkeypatch):
    settings = head_config(listen=HEAD_ADDRESS, allow=["192.168.1.0/24"], api_key_file="/etc/r1fleet/api-key")
    unit = deploy(monkeypatch, settings=settings).uploads[UNIT]
    assert f"IPAddressAllow=localhost {HEAD_ADDRESS} 192.168.1.0/24 {WORKER_ADDRESS}\n" in unit
    assert "--api-key-file %d/api-key" in unit


def test_a_worker_that_is_down_fails_the_head_by_name(monkeypatch):
    run = deploy(monkeypatch, responses={"/dev/tcp/192.168.1.32/50052": "down box-b",
                                         "did not accept a TCP connection": {"success": False}})
    assert run.failed
    assert run.ran("RPC workers of pool big", "r1fleet: pool big: the head box-a")  # (the apostrophe after it is shell-quoted)
    assert run.ran("RPC workers of pool big", "RPC workers: box-b (192.168.1.32:50052) did not accept a TCP connection within 120s (fix: ")
    assert run.never_ran("systemctl restart r1fleet-llama-server")


def test_a_second_run_on_a_converged_head_changes_nothing(monkeypatch):
    first = deploy(monkeypatch)
    converged = {
        "cat /etc/group": ["root:x:0:", "video:x:44:", "render:x:993:", "llama:x:998:"],
        **ff.users(("llama", "/var/lib/llama", "/usr/sbin/nologin", ["video", "render"])),
        **ff.directory("/var/lib/llama", "llama", "llama", "drwxr-x---"),
        **ff.directory("/var/lib/r1fleet/models/llama.cpp", "llama", "llama", "drwxr-x---"),
        **ff.directory("/var/lib/r1fleet/models", "root", "root", "drwxr-xr-x"),
        **ff.directory("/etc/systemd/system", "root", "root", "drwxr-xr-x"),
        **ff.sha256_of(MODEL, "d" * 64),
        **ff.file_content(UNIT, first.uploads[UNIT]),
        **ff.running("r1fleet-llama-server.service"),
        "dpkg -l": ff.dpkg_installed("curl", "ca-certificates", "llama.cpp-tools", "libggml0-backend-cuda",
                                     "libggml0-backend-rpc"),
    }
    again = deploy(monkeypatch, responses=converged)
    assert not again.failed and again.changed == []
    assert again.never_ran("systemctl restart") and again.never_ran("/health")
    assert again.ran("RPC workers of pool big", "/dev/tcp/192.168.1.32/50052")  # the workers are checked on every run, changing nothing


def test_a_single_host_keeps_its_arguments(monkeypatch):
    """No pool: the unit has no wait, no --rpc, and the serving allow-list only (the existing tests pin the rest)."""
    h = head()
    settings = head_config()
    base = llama_cpp_install(FORKY, h.plan, settings, SID_CUDA)
    run = run_role(head_role, h.plan, settings, base, DOWNLOAD, None, monkeypatch=monkeypatch)
    unit = run.uploads[UNIT]
    assert "ExecStartPre=/bin/bash" not in unit and "--rpc" not in unit and "TimeoutStartSec" not in unit
    assert "IPAddressAllow=localhost\n" in unit and run.never_ran("/dev/tcp/")
