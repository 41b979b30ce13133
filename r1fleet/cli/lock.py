"""`r1fleet lock` and `r1fleet plan --fleet F --diff`: write the fleet lock, and compare a fleet with it.

    r1fleet lock --fleet inventory/fleet.yml              # probe and lock every host
    r1fleet lock --fleet inventory/fleet.yml dual-3090    # relock one host, the others' entries kept
    r1fleet plan --fleet inventory/fleet.yml --diff       # what a relock would change, and why

Both probe the hosts as `r1fleet plan --fleet` does (r1fleet.cli.probing.fleet_probes), or read saved probes
with --probe-dir DIR (DIR/HOST.probe).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from r1fleet.artifacts.llama_cpp_install import pool_source_problems
from r1fleet.errors import R1FleetError
from r1fleet.cache.registry import manifest_key
from r1fleet.cache.store import ArtifactCache, cache_root
from r1fleet.cli.probing import fleet_probe_results, fleet_probes
from r1fleet.fleet.config import read_api_key
from r1fleet.fleet.file import FLEET_HELP, load_fleet
from r1fleet.hardware import parse_probe
from r1fleet.lock.artifacts import OllamaManifest, with_gateway
from r1fleet.lock.match import Lock, fingerprint_differences, fingerprint_of, lock_entry, lock_path, plan_diff, read_lock, relock_command, write_lock
from r1fleet.plan.planner import plan_host
from r1fleet.plan.pools import plan_members
from r1fleet.roles.ollama.decide import registry_of, takes_from_registry
from r1fleet.lock.served import Served, rehearsed, served_in_pool
from r1fleet.deploy.refusals import deploy_refusal
from r1fleet.roles.rpc_worker.decide import pool_versions

LOCK_LOCATION = ("The lock is <fleet file>.lock beside the fleet file; the lab's (`--fleet lab`, whose fleet file ships "
                 "inside the package) is inventory/lab.yml.lock in a checkout, else /var/lib/r1fleet-lab/lab.yml.lock")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "lock", help="pin each host's hardware, plan and artifacts in <fleet>.lock (reproducible rebuilds)",
        description=("Probe the fleet's hosts, plan each, and write <fleet>.lock: per host its hardware fingerprint, "
                     "the whole plan, and every artifact by digest. Commit it. " + LOCK_LOCATION + "."),
    )
    p.add_argument("hosts", nargs="*", metavar="HOST", help="relock only these hosts; the others' entries stay as they are")
    p.add_argument("--fleet", help=FLEET_HELP + "; the lab's lock is inventory/lab.yml.lock")
    p.add_argument("--probe-dir", type=Path, metavar="DIR", help="read each host's probe from DIR/HOST.probe instead of over SSH")
    p.add_argument("--api-key", action="append", default=[], metavar="HOST=FILE",
                   help="record the fingerprint (a sha256 prefix, never the key) of HOST's API key file on this machine")
    p.set_defaults(run=cmd_lock)
    return p


def _api_keys(pairs: list[str], fleet) -> dict[str, bytes]:
    """--api-key HOST=FILE, else each host's api_key_source: the key as the deploy installs it."""
    keys = {name: entry.api_key_text() for name, entry in fleet.hosts.items() if entry.api_key_source}
    for pair in pairs:
        host, sep, file = pair.partition("=")
        if not sep or not file or host not in fleet.hosts:
            raise R1FleetError(f"{pair!r} is not HOST=FILE for a host of {fleet.source}", field="--api-key",
                               fix="write e.g. --api-key dual-3090=~/secrets/dual-3090.key")
        keys[host] = read_api_key(file, host, "--api-key")
    return keys


def cmd_lock(args: argparse.Namespace) -> int:
    fleet = load_fleet(args.fleet)
    keys = _api_keys(args.api_key, fleet)
    jobs = fleet_probes(fleet, args.hosts, args.probe_dir)
    path = lock_path(fleet.source)
    old = read_lock(path) or Lock()
    # A full relock is the fleet as it is now (hosts gone from it leave); naming hosts touches only those.
    hosts = dict(old.hosts) if args.hosts else {}
    lines = []
    probed = {}
    for host, text, policy, settings in jobs:
        hw = probed.setdefault(host, (parse_probe(text, host), policy))[0]
        entry = lock_entry(host, hw, plan_host(hw, policy), settings, api_key_text=keys.get(host))
        previous = old.hosts.get(host)
        if entry.api_key_fingerprint is None and previous is not None:  # not given this time: the key is unchanged
            entry = entry.model_copy(update={"api_key_fingerprint": previous.api_key_fingerprint})
        entry = with_manifest(entry, settings, fleet.cache_dir, previous)
        if fleet.gateway is not None and fleet.gateway.host == host:
            entry = entry.model_copy(update={"artifacts": with_gateway(entry.artifacts, hw)})
        hosts[host] = entry
        lines.append(_lock_line(host, entry, previous))
    pools = _pools(fleet, probed, old)
    refused = {}
    for host, (hw, _policy) in probed.items():
        refusal = locked_refusal(host, hosts[host], hw, fleet, pools)
        if refusal is not None:
            refused[host] = refusal
            hosts[host] = with_note(hosts[host], f"the deploy will refuse this host: {refusal}", str(refusal))
    lock = Lock(hosts=hosts, pools=pools)
    write_lock(path, lock)
    print(f"{path}: {len(jobs)} of {len(lock.hosts)} hosts locked")
    for line, (host, *_) in zip(lines, jobs):
        said = str(refused[host]).removeprefix(f"host {host}: ") if host in refused else None
        print(line + (f"\n    the deploy will refuse it: {said}" if said else ""))
    return 0 if all(hosts[h].plan.fits for h, *_ in jobs) and not refused else 1


def locked_refusal(host: str, entry, hw, fleet, pools: dict):
    """What the deploy of the lock just written will refuse this host for (r1fleet/deploy/refusals.py), or None: its
    part of a pooled pool it belongs to, else its locked plan."""
    settings = fleet.hosts[host]
    pool = next((p for p in pools.values() if p.pooled and host in (p.head, *p.workers)), None)
    try:
        served = served_in_pool(settings, hw, pool, locked=True) if pool else Served(host, entry.plan, locked=True)
    except R1FleetError as err:
        return err
    return deploy_refusal(served, settings, hw, fleet.hosts)


def with_note(entry, note: str, said: str):
    """The entry with `note` added to its artifacts' notes, unless a note says `said` already."""
    if any(said in existing for existing in entry.artifacts.notes):
        return entry
    artifacts = entry.artifacts.model_copy(update={"notes": [*entry.artifacts.notes, note]})
    return entry.model_copy(update={"artifacts": artifacts})


def with_manifest(entry, settings, cache_dir: str | None, previous):
    """The entry with the Ollama manifest this controller's cache took for its tag (the digest the host
    serves), or the one locked before for the same tag; unchanged when neither is known (a host not deployed
    yet: relock after its first deploy to record it)."""
    model, plan = entry.artifacts.model, rehearsed(entry.plan, settings)
    if model is None or not takes_from_registry(plan, settings, entry.fingerprint.system):
        return entry
    sha = ArtifactCache(cache_root(cache_dir)).recall(manifest_key(registry_of(settings), plan.ollama_tag))
    manifest = OllamaManifest(tag=plan.ollama_tag, sha256=sha) if sha else None
    before = previous.artifacts.model.ollama_manifest if previous and previous.artifacts.model else None
    if manifest is None and before is not None and before.tag == plan.ollama_tag:
        manifest = before
    artifacts = entry.artifacts.model_copy(update={"model": model.model_copy(update={"ollama_manifest": manifest})})
    return entry.model_copy(update={"artifacts": artifacts})


def _pools(fleet, probed: dict, old) -> dict:
    """Each pool planned from its members' probes of this run, {host: (hardware, policy)} (a pool with a member
    not probed now keeps its locked plan): the lock holds what the deploy of the pool serves."""
    pools = {name: plan for name, plan in old.pools.items() if name in fleet.pools}
    for name, pool in fleet.pools.items():
        if all(member in probed for member in pool.hosts):
            unpoolable = pool_source_problems(name, pool.head, {m: (probed[m][0], fleet.hosts[m]) for m in pool.hosts})
            planned = plan_members(name, pool, [probed[m][0] for m in pool.hosts], [probed[m][1] for m in pool.hosts],
                                   unpoolable)
            pools[name] = with_versions(planned, {m: probed[m][0] for m in pool.hosts})
    return pools


def with_versions(pool, hardware: dict):
    """A pooled pool with the llama.cpp versions its members have installed (their probes), when they agree: the
    deploy then installs exactly those and checks them before each start. Not yet deployed, or members that
    disagree: nothing recorded (the deploy agrees on a version itself, or refuses naming the members)."""
    if not pool.pooled:
        return pool
    offers = {m: {package: (version, None) for package, version in (hw.llama_cpp_apt.installed if hw.llama_cpp_apt else {}).items()}
              for m, hw in hardware.items()}
    try:
        versions = pool_versions(pool, offers)
    except R1FleetError:
        return pool
    return pool.model_copy(update={"llama_cpp_versions": versions})


def _lock_line(host: str, entry, previous) -> str:
    plan = entry.plan
    what = (f"{plan.model} on {plan.backend}, context {plan.context_length}, {plan.kv_cache_type} KV"
            if plan.model else "nothing fits")
    if previous is None:
        status = "new"
    else:
        changes = [c for c in plan_diff(previous.plan, plan) if not c.startswith("why: ")]
        status = ("changed: " + "; ".join(changes)) if changes else "plan unchanged"
    return f"  {host}: {what} ({status})"


# ---------------------------------------------------------------- plan --diff


@dataclass
class HostDiff:
    host: str
    status: str  # matches | changes | hardware | unlocked | not-in-fleet | unprobed
    changes: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    fix: str | None = None


def diff_hosts(lock, rows: list, fleet_ref: str | None, unprobed: list[HostDiff] = ()) -> list[HostDiff]:
    """Per host (rows of (host, Hardware, today's plan)): the lock compared with today (pure); the hosts that could
    not be probed (`unprobed`) after them."""
    out = []
    for host, hw, fresh in rows:
        entry = lock.hosts.get(host)
        if entry is None:
            out.append(HostDiff(host, "unlocked", fix=relock_command(host, fleet_ref)))
            continue
        differences = fingerprint_differences(entry.fingerprint, fingerprint_of(hw))
        changes = plan_diff(entry.plan, fresh)
        status = "hardware" if differences else "changes" if changes else "matches"
        fix = relock_command(host, fleet_ref) if status != "matches" else None
        out.append(HostDiff(host, status, changes, differences, fix))
    out += unprobed
    seen = {host for host, *_ in rows} | {d.host for d in unprobed}
    out += [HostDiff(h, "not-in-fleet") for h in sorted(lock.hosts) if h not in seen]
    return out


def diff_text(diffs: list[HostDiff]) -> str:
    heads = {
        "matches": "matches the lock",
        "changes": "a relock would change:",
        "hardware": "the hardware differs from the lock (a locked deploy stops this host):",
        "unlocked": "not in the lock (deployed from today's plan)",
        "not-in-fleet": "in the lock but not in the fleet (a full `r1fleet lock` drops it)",
        "unprobed": "not compared: it could not be probed",
    }
    lines = []
    for d in diffs:
        lines.append(f"{d.host}: {heads[d.status]}")
        lines += [f"  - {line}" for line in d.differences]
        if d.status == "hardware" and d.changes:
            lines.append("  a relock would change:")
        lines += [f"  - {line}" for line in d.changes]
        if d.fix:
            lines.append(f"  to lock today's plan: {d.fix}")
    return "\n".join(lines)


def cmd_plan_diff(args: argparse.Namespace) -> int:
    forced = [flag for flag, value in (("--model", args.model), ("--context", args.context),
                                       ("--flash-attention", args.flash_attention), ("--kv-type", args.kv_type)) if value]
    if forced or args.probes:
        raise R1FleetError(f"--diff compares the lock with what `r1fleet lock` would write from the fleet file, "
                           f"which takes no {(forced or ['probe files'])[0]}", field="--diff",
                           fix="drop it, or set it in the fleet file's policy")
    fleet = load_fleet(args.fleet)
    path = lock_path(fleet.source)
    lock = read_lock(path)
    if lock is None:
        fleet_flag = f" --fleet {args.fleet}" if args.fleet else ""
        raise R1FleetError(f"{path}: no lock to compare with", fix=f"write one with `r1fleet lock{fleet_flag}`")
    rows, unprobed = [], []
    for host, text, policy, _entry in fleet_probe_results(fleet, probe_dir=args.probe_dir):
        try:
            if isinstance(text, R1FleetError):
                raise text
            hw = parse_probe(text, host)
        except R1FleetError as err:  # this host alone is not compared
            unprobed.append(HostDiff(host, "unprobed", differences=[str(err).removeprefix(f"host {host}: ")]))
            continue
        rows.append((host, hw, plan_host(hw, policy)))
    diffs = diff_hosts(lock, rows, args.fleet, unprobed)
    if args.json:
        print(json.dumps({"lock": str(path), "hosts": [asdict(d) for d in diffs]}, indent=2))
    else:
        print(f"{path}:")
        print(diff_text(diffs))
    return 0 if all(d.status == "matches" for d in diffs) else 1
