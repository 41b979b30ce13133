"""Pools (issue 14, planning only): one model across several hosts through llama.cpp's RPC backend.

The pool planner reuses the single-host split (placement.py) over the pool's GPUs in llama.cpp's device order
(RPC devices first, the head's last) and adds the network's cost per token to the speed estimate.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from r1fleet.cli import main as cli
from r1fleet.plan.catalog import load_catalog
from r1fleet.errors import FleetError
from r1fleet.fleet.file import json_schema, load_fleet
from r1fleet.hardware import parse_probe
from r1fleet.records import Hardware
from r1fleet.plan.planner import plan_host
from r1fleet.plan.policy import Policy
from r1fleet.plan.pool_settings import PoolSettings
from r1fleet.plan.pools import member_plan, network_cost, plan_pools
from r1fleet.tensor_split import flag_for_layers

PROBES = Path(__file__).resolve().parents[1] / "fixtures" / "probes"
ID = {m.size_label: m.id for m in load_catalog().models}
KIB = 1024


def single_3090_probe(uuid: str) -> str:
    """A host with one RTX 3090: the dual-3090 probe without its second card (GPU 1, bus 08:00) in every section
    that lists it (nvidia-smi query and table, lspci, DRM), and with its own GPU UUID."""
    lines = (PROBES / "dual-rtx3090.probe").read_text().splitlines(keepends=True)
    kept, skip = [], 0
    for line in lines:
        if skip:
            skip -= 1
            continue
        if line.startswith(("1, NVIDIA GeForce RTX 3090", "08:00.", "card1 ")):
            continue
        if line.startswith("|   1  NVIDIA GeForce RTX 3090"):
            skip = 3  # the card's two other table lines and its separator
            continue
        kept.append(line)
    return "".join(kept).replace("GPU-059b0f98-c26c-7955-0a6b-76b43117d823", uuid)


BOX_A = single_3090_probe("GPU-0000000a-c26c-7955-0a6b-76b43117d823")
BOX_B = single_3090_probe("GPU-0000000b-c26c-7955-0a6b-76b43117d823")
FORKY_OS_RELEASE = ('PRETTY_NAME="Debian GNU/Linux forky/sid"\nNAME="Debian GNU/Linux"\nVERSION_CODENAME=forky\n'
                    'ID=debian\nHOME_URL="https://www.debian.org/"\n')


def on_forky(text: str) -> str:
    """The same host on Debian forky (testing, no VERSION_ID), whose packages give a pool llama.cpp's RPC pieces."""
    return re.sub(r"(#### r1fleet:os-release\n).*?(?=#### r1fleet:)", lambda m: m.group(1) + FORKY_OS_RELEASE, text,
                  flags=re.S)


# apt-cache policy on Debian sid with contrib (its os-release says forky too), apt's lists fetched
SID_APT = "#### r1fleet:llama-cpp-packages\nlists: present\n" + "".join(
    f"{package}:\n  Installed: (none)\n  Candidate: {version}\n" for package, version in (
        ("llama.cpp-tools", "1:0.7.0+dfsg-2"), ("llama.cpp-tools-extra", "1:0.7.0+dfsg-2"),
        ("libggml0-backend-rpc", "0.27.0-1"), ("libggml0-backend-cuda", "0.27.0-1")))


def on_sid(text: str) -> str:
    """The same host on Debian sid with contrib, whose apt offers NVIDIA's backend package too (the probe read it)."""
    return on_forky(text).replace("#### r1fleet:secureboot", SID_APT + "#### r1fleet:secureboot")


def plan_fleet(probes: dict[str, str], pools: dict[str, PoolSettings], policies: dict[str, Policy] | None = None):
    """What `r1fleet plan --fleet` does: each host alone, then the pools."""
    hardware = [parse_probe(text, host) for host, text in probes.items()]
    policy_list = [(policies or {}).get(hw.host, Policy()) for hw in hardware]
    plans = [plan_host(hw, policy) for hw, policy in zip(hardware, policy_list)]
    return plan_pools(pools, hardware, plans, policy_list)


BIG = {"big": PoolSettings(hosts=["box-a", "box-b"], head="box-a")}


def test_the_derived_probe_is_one_3090():
    hw = parse_probe(BOX_A, "box-a")
    assert [(g.index, g.name, g.memory_free_mib) for g in hw.gpus] == [(0, "NVIDIA GeForce RTX 3090", 23975)]
    assert plan_host(hw).model == ID["32b"]  # alone, a 24 GB card holds the 32B, not the 70B


def test_two_single_3090_hosts_pool_the_70b():
    (pool,), hosts = plan_fleet({"box-a": BOX_A, "box-b": BOX_B}, BIG)
    assert pool.pooled and pool.model == ID["70b"] and pool.backend == "llama.cpp"
    assert (pool.head, pool.workers) == ("box-a", ["box-b"])
    assert hosts == []  # the members are part of the pool, not planned separately
    assert pool.context_length >= 8192 and pool.kv_cache_type == "f16"
    # llama.cpp's order: the worker's GPU (an RPC device) first, the head's GPU last with the output
    worker, head = pool.devices
    assert (worker.host, worker.rpc, worker.output) == ("box-b", True, False)
    assert (head.host, head.rpc, head.output) == ("box-a", False, True)
    assert worker.gpu_uuid.startswith("GPU-0000000b") and head.device == "GPU0 NVIDIA GeForce RTX 3090"
    assert sum(pool.tensor_split) == 80 and [d.layers for d in pool.devices] == pool.tensor_split
    assert pool.tensor_split_flag == flag_for_layers(pool.tensor_split)
    for device in pool.devices:
        assert device.planned_mib <= device.capacity_mib
        assert device.compute_mib > 0 and device.overhead_mib == 600  # an rpc-server's GPU is planned as a local one
    assert any("box-a alone: 32b at" in r and "box-b alone: 32b at" in r for r in pool.reasons)
    assert any("--rpc to box-b (port 50052)" in r and "--tensor-split" in r for r in pool.reasons)


def test_the_pool_is_the_dual_3090_split_plus_the_network():
    """The same two GPUs in one host: the same memory per device; the network only lowers the speed."""
    (pool,), _ = plan_fleet({"box-a": BOX_A, "box-b": BOX_B}, BIG)
    dual = plan_host(parse_probe((PROBES / "dual-rtx3090.probe").read_text(), "dual"))
    assert (pool.model, pool.context_length, pool.tensor_split) == (dual.model, dual.context_length, dual.tensor_split)
    assert [d.planned_mib for d in pool.devices] == [d.planned_mib for d in dual.devices]
    assert pool.est_tokens_per_second_one_host == dual.est_tokens_per_second
    assert pool.est_tokens_per_second < dual.est_tokens_per_second
    assert pool.network_ms_per_token == pytest.approx(2 * 32 * KIB * 8 / 1e9 * 1000 + 3 * 0.3, abs=0.01)


def test_network_cost_counts_crossings_and_round_trips():
    m70 = load_catalog().find("70b")
    one = network_cost(m70, ("b", "a"), [41, 39], head="a", gbps=1.0)
    assert (one.crossings, one.bytes_per_crossing, one.round_trips) == (2, 8192 * 4, 3)
    assert one.seconds == pytest.approx(2 * 8192 * 4 * 8 / 1e9 + 3 * 0.3e-3)
    two_gpus = network_cost(m70, ("b", "b", "a"), [27, 27, 26], head="a", gbps=1.0)
    assert (two_gpus.crossings, two_gpus.round_trips) == (2, 6)  # one worker: in and out once, each device its own trips
    two_workers = network_cost(m70, ("b", "c", "a"), [27, 27, 26], head="a", gbps=1.0)
    assert two_workers.crossings == 4  # worker to worker goes through the head
    assert network_cost(m70, ("b", "a"), [0, 80], head="a", gbps=1.0).seconds == 0  # a device without layers is idle
    assert network_cost(m70, ("b", "a"), [41, 39], head="a", gbps=0.1).seconds > one.seconds


def test_a_slower_link_lowers_the_estimate():
    slow = {"big": PoolSettings(hosts=["box-a", "box-b"], head="box-a", network_gbps=0.1)}
    (fast,), _ = plan_fleet({"box-a": BOX_A, "box-b": BOX_B}, BIG)
    (wifi,), _ = plan_fleet({"box-a": BOX_A, "box-b": BOX_B}, slow)
    assert wifi.pooled and wifi.est_tokens_per_second < fast.est_tokens_per_second


def test_members_that_each_hold_the_largest_model_stay_separate():
    h200 = (PROBES / "h200.probe").read_text()
    (pool,), hosts = plan_fleet({"h1": h200, "h2": h200}, {"p": PoolSettings(hosts=["h1", "h2"], head="h1")})
    assert not pool.pooled and pool.model is None and pool.devices == []
    assert [p.host for p in hosts] == ["h1", "h2"] and all(p.model == ID["70b"] for p in hosts)
    assert "each member already holds the largest distill (70b) alone" in pool.reasons[0]
    assert any("h1 alone: 70b at 32768" in r for r in pool.reasons)


def test_the_speed_floor_keeps_members_separate_and_says_so():
    strict = Policy(min_tokens_per_second=20, max_context=16384)
    (pool,), hosts = plan_fleet({"box-a": BOX_A, "box-b": BOX_B}, BIG, {"box-a": strict, "box-b": strict})
    assert not pool.pooled and [p.model for p in hosts] == [ID["32b"], ID["32b"]]
    assert "pool 70b estimated 16.9 tokens/s < floor 20" in pool.reasons[0]
    assert "less than 2x" in pool.reasons[0]  # the 32B pooled gains no context over 32B alone at this max_context


def test_the_same_model_at_twice_the_context_is_a_reason_to_pool():
    dual = (PROBES / "dual-rtx3090.probe").read_text()
    (pool,), hosts = plan_fleet({"a": dual, "b": dual}, {"p": PoolSettings(hosts=["a", "b"], head="a")})
    alone = plan_host(parse_probe(dual, "a"))
    assert pool.pooled and pool.model == alone.model == ID["70b"] and hosts == []
    assert pool.context_length >= 2 * alone.context_length and len(pool.devices) == 4
    assert [d.host for d in pool.devices] == ["b", "b", "a", "a"] and pool.devices[-1].output
    assert pool.reasons[1].startswith("a longer context than any member alone")


def test_a_member_without_a_gpu_is_not_pooled():
    cpu = (PROBES / "cpu-16g.probe").read_text()
    (pool,), hosts = plan_fleet({"box-a": BOX_A, "mini": cpu}, {"p": PoolSettings(hosts=["box-a", "mini"], head="box-a")})
    assert not pool.pooled and len(hosts) == 2
    assert "mini has no discrete GPU to lend" in pool.reasons[0]


def test_a_head_that_forces_ollama_is_not_pooled():
    (pool,), _ = plan_fleet({"box-a": BOX_A, "box-b": BOX_B}, BIG, {"box-a": Policy(backend="ollama")})
    assert not pool.pooled and "forces backend ollama" in pool.reasons[0]


# ---------------------------------------------------------------- the fleet file


def write_fleet(tmp_path: Path, pools: str, hosts: str = "box-a: {address: 10.0.0.1}\n  box-b: {address: 10.0.0.2}\n") -> Path:
    path = tmp_path / "fleet.yml"
    path.write_text(f"hosts:\n  {hosts}pools:\n{pools}")
    return path


def test_pool_defaults_and_worker_order(tmp_path):
    fleet = load_fleet(write_fleet(tmp_path, "  big: {hosts: [box-b, box-a], head: box-a}\n"))
    pool = fleet.pools["big"]
    assert (pool.network_gbps, pool.rpc_port, pool.workers) == (1.0, 50052, ["box-b"])
    assert load_fleet(PROBES.parents[2] / "inventory/fleet.example.yml").pools == {}  # pooling is opt-in


@pytest.mark.parametrize(
    "pools,expected",
    [
        ("  big: {hosts: [box-a, box-b], head: box-c}\n", ["pool big", "field head", "'box-c' is not one of the pool's hosts", "fix:"]),
        ("  big: {hosts: [box-a, box-x], head: box-a}\n", ["pool big", "field hosts", "'box-x' is not a host of this fleet", "box-a, box-b"]),
        ("  big: {hosts: [box-a], head: box-a}\n", ["pool big", "field hosts", "at least 2 hosts", "fix: add a worker"]),
        ("  big: {hosts: [box-a, box-a], head: box-a}\n", ["pool big", "box-a is listed twice", "at least 2 hosts"]),
        ("  p1: {hosts: [box-a, box-b], head: box-a}\n  p2: {hosts: [box-b, box-a], head: box-b}\n",
         ["pool p2: field hosts: box-b is already in pool p1", "one pool at most", "pool p2: field hosts: box-a is already in pool p1"]),
        ("  big: {hosts: [box-a, box-b], head: box-a, network_gbps: 0}\n", ["pool big: field network_gbps", "greater than 0", "raise the value"]),
        ("  big: {hosts: [box-a, box-b], head: box-a, rpc_port: 70000}\n", ["pool big: field rpc_port", "lower the value"]),
        ("  big: {hosts: [box-a, box-b], head: box-a, rpc_prot: 1}\n", ["pool big: field rpc_prot", "correct its spelling"]),
        ("  big: {hosts: [box-a, box-b]}\n", ["pool big: field head", "Field required", "fix: add it"]),
        ("  'bad pool!': {hosts: [box-a, box-b], head: box-a}\n", ["pool name 'bad pool!'"]),
    ],
)
def test_each_pool_mistake_is_named(tmp_path, pools, expected):
    with pytest.raises(FleetError) as caught:
        load_fleet(write_fleet(tmp_path, pools))
    for fragment in expected:
        assert fragment in str(caught.value), (fragment, str(caught.value))


def test_schema_covers_pools():
    text = json.dumps(json_schema())
    assert "network_gbps" in text and "rpc_port" in text


# ---------------------------------------------------------------- r1fleet plan --fleet


@pytest.fixture
def pooled_fleet(tmp_path, monkeypatch) -> Path:
    """A fleet of two single-3090 boxes on Debian sid in a pool and a 4090 box alone, probed without SSH."""
    from r1fleet.cli import probing

    texts = {"10.0.0.1": on_sid(BOX_A), "10.0.0.2": on_sid(BOX_B), "10.0.0.3": (PROBES / "rtx4090.probe").read_text()}
    monkeypatch.setattr(probing, "probe_over_ssh", lambda address, **_: texts[address])
    return write_fleet(tmp_path, "  big: {hosts: [box-a, box-b], head: box-a}\n",
                       "box-a: {address: 10.0.0.1}\n  box-b: {address: 10.0.0.2}\n  solo: {address: 10.0.0.3}\n")


def test_plan_json_lists_the_pool_and_not_its_members(pooled_fleet, capsys):
    assert cli.main(["plan", "--fleet", str(pooled_fleet), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [h["host"] for h in out["hosts"]] == ["solo"]
    (pool,) = out["pools"]
    assert pool["pool"] == "big" and pool["pooled"] and pool["model"] == ID["70b"]
    assert pool["tensor_split_flag"] == flag_for_layers(pool["tensor_split"]) and pool["rpc_port"] == 50052
    assert [(d["host"], d["rpc"]) for d in pool["devices"]] == [("box-b", True), ("box-a", False)]
    assert pool["est_tokens_per_second"] < pool["est_tokens_per_second_one_host"]


def test_plan_table_shows_the_pool_as_one_row(pooled_fleet, capsys):
    assert cli.main(["plan", "--fleet", str(pooled_fleet)]) == 0
    table, _, reasons = capsys.readouterr().out.partition("\n\n")
    rows = table.splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["solo", "pool"]
    assert "70b" in rows[1] and "--rpc -ts" in rows[1] and "box-b:GPU0" in rows[1] and "box-a:GPU0" in rows[1]
    assert "pool big (head box-a; workers box-b):" in reasons and "box-a alone: 32b" in reasons


@pytest.mark.parametrize("system, why", [
    (lambda text: text, "box-a runs ubuntu jammy: a pool's rpc-server and RPC backend come from Debian forky or sid's "
                        "packages alone (the Ollama archive has neither) (to pool it: run box-a on Debian forky or sid, "
                        "or take box-a out of pool big)"),
    (on_forky, "apt on box-a offers no libggml0-backend-cuda (libggml0-backend-cuda is in Debian sid's contrib alone), "
               "as far as r1fleet knows without the host's apt lists (to pool it: on box-a, add Debian sid with contrib "
               "to its apt sources, run apt-get update and plan again, or take box-a out of pool big)"),
], ids=["ubuntu", "forky-nvidia"])
def test_a_pool_the_deploy_cannot_build_is_kept_separate_saying_why_and_how(tmp_path, monkeypatch, capsys, system, why):
    """Issue 23 item 7: on Ubuntu a pool's llama.cpp would come from the pinned Ollama archive, which has no
    rpc-server; on forky (or a sid whose apt lists were never read) NVIDIA's backend package is not known to be
    there. The plan offers only what the deploy builds: the pool is kept separate, saying what it would serve, why
    not and what would make it possible, and each member is planned alone (which the deploy serves)."""
    from r1fleet.cli import probing

    texts = {"10.0.0.1": system(BOX_A), "10.0.0.2": system(BOX_B)}
    monkeypatch.setattr(probing, "probe_over_ssh", lambda address, **_: texts[address])
    fleet = write_fleet(tmp_path, "  big: {hosts: [box-a, box-b], head: box-a}\n",
                        "box-a: {address: 10.0.0.1}\n  box-b: {address: 10.0.0.2}\n")
    assert cli.main(["plan", "--fleet", str(fleet)]) == 0
    out = capsys.readouterr().out
    assert "kept separate: pooled, it would serve 70b at context 14336, but the deploy cannot build it: " in out
    assert why in out and why.replace("box-a", "box-b") in out
    assert cli.main(["plan", "--fleet", str(fleet), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert [p["pooled"] for p in planned["pools"]] == [False] and not planned.get("refused")
    assert [h["host"] for h in planned["hosts"]] == ["box-a", "box-b"]  # each alone


def test_hosts_plan_as_before_without_pools():
    hw: Hardware = parse_probe(BOX_A, "box-a")
    plan = plan_host(hw)
    pools, hosts = plan_pools({}, [hw], [plan], [Policy()])
    assert pools == [] and hosts == [plan]


def test_the_heads_llama_server_gets_a_prompt_cache_sized_by_its_own_ram_and_a_worker_none():
    small_head = BOX_A.replace("MemTotal:       131841624 kB", "MemTotal:       8388608 kB")
    assert small_head != BOX_A
    (pool,), _ = plan_fleet({"box-a": small_head, "box-b": BOX_B}, BIG)
    head = member_plan(pool, "box-a", parse_probe(small_head, "box-a"))
    worker = member_plan(pool, "box-b", parse_probe(BOX_B, "box-b"))
    assert head.cache_ram_mib == 5120  # 8192 MiB - 2048 for the system - the 70B's 830 MiB of host buffers
    assert worker.cache_ram_mib is None
    roomy = member_plan(pool, "box-a", parse_probe(BOX_A, "box-a"))
    assert roomy.cache_ram_mib == 8192
