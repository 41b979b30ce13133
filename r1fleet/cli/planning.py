"""`r1fleet plan`: what each host gets, and why, host by host.

Each host of a fleet is planned as the deploy would serve it (r1fleet/lock/served.py: the lock's plan while its
hardware matches, else today's; a pool member its part of the pool) and marked where the deploy will refuse it
(r1fleet/deploy/refusals.py), with the deploy's own reason and fix. A host that cannot be probed (down, its saved
probe missing or unreadable) gets its row with the reason and fix, and the others are planned. What-if runs
(`--model`, `--context`, `--flash-attention`, `--kv-type`) plan today's choice under the forced settings, lock aside.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from r1fleet.artifacts.llama_cpp_install import pool_source_problems
from r1fleet.cli.probing import fleet_probe_results
from r1fleet.deploy.refusals import deploy_refusal
from r1fleet.errors import R1FleetError
from r1fleet.fleet.config import HostConfig
from r1fleet.fleet.file import Fleet, load_fleet
from r1fleet.hardware import parse_probe
from r1fleet.lock.match import fleet_lock
from r1fleet.lock.served import Served, lock_note, pool_lock_note, served_in_pool, served_plans
from r1fleet.plan.catalog import load_catalog
from r1fleet.probe.text import CONTROLS
from r1fleet.plan.planner import plan_host
from r1fleet.plan.policy import Policy
from r1fleet.plan.pools import plan_pools, pool_heading, pool_row
from r1fleet.records import Hardware, HostPlan, PoolPlan
from r1fleet.tensor_split import format_flag


@dataclass
class Job:
    """One host to plan: its probe document (or why there is none), policy and settings."""

    host: str
    text: str | R1FleetError
    policy: Policy
    settings: HostConfig
    in_fleet: bool = False


@dataclass
class Row:
    """One host as `r1fleet plan` shows it."""

    host: str
    plan: HostPlan | None = None  # None: not planned, `error` says why
    error: R1FleetError | None = None
    refusal: R1FleetError | None = None  # the deploy will stop this host
    note: str | None = None  # served from the fleet lock, not today's plan
    pooled: bool = False  # a member of a pooled pool: shown in its pool's row


@dataclass
class Outcome:
    rows: list[Row] = field(default_factory=list)
    pools: list[PoolPlan] = field(default_factory=list)
    pool_refusals: dict[str, list[str]] = field(default_factory=dict)  # pool -> "the deploy refuses X: ..."
    pool_notes: dict[str, str] = field(default_factory=dict)  # pool -> served from the lock, not today's plan

    @property
    def ok(self) -> bool:
        return (all(r.plan is not None and r.plan.fits and r.refusal is None for r in self.rows if not r.pooled)
                and not any(self.pool_refusals.values()) and all(r.error is None for r in self.rows))


def jobs_for(args: argparse.Namespace, fleet: Fleet | None) -> list[Job]:
    """Probe files by hand (the host is the file stem; an unreadable one is a usage error), then the fleet's hosts
    (one that cannot be probed keeps its error)."""
    jobs = []
    for path in args.probes:
        try:
            text = path.read_text(errors="replace")  # a stray byte is the parser's to judge, not a crash
        except OSError as err:
            raise R1FleetError(f"{path}: cannot read ({err.strerror})", fix="check the path") from None
        jobs.append(Job(path.stem, text, Policy(), HostConfig(name=path.stem, address="localhost")))
    if getattr(args, "this_machine", None):  # (name, probe document): `r1fleet plan` with nothing to plan
        name, text = args.this_machine
        jobs.append(Job(name, text, Policy(), HostConfig(name=name, address="127.0.0.1")))
    if fleet is not None:
        jobs += [Job(host, text, policy, entry, True)
                 for host, text, policy, entry in fleet_probe_results(fleet, probe_dir=args.probe_dir)]
    return jobs


def parsed(job: Job) -> Hardware | R1FleetError:
    if isinstance(job.text, R1FleetError):
        return job.text
    try:
        return parse_probe(job.text, job.host)
    except R1FleetError as err:
        if not job.in_fleet:
            raise  # a probe file given by hand: the usage error it always was
        return err


def plan_jobs(jobs: list[Job], fleet: Fleet | None, model: str | None = None, context: int | None = None,
              what_if: dict | None = None) -> Outcome:
    """Every host's row and every pool's plan (pure, given the probe documents)."""
    hardware: dict[str, Hardware] = {}
    errors: dict[str, R1FleetError] = {}
    for job in jobs:
        answer = parsed(job)
        if isinstance(answer, Hardware):
            hardware[job.host] = answer
        else:
            errors[job.host] = answer
    live = [job for job in jobs if job.host in hardware]
    policies = [job.policy.model_copy(update=what_if or {}) for job in live]
    today = [plan_host(hardware[job.host], policy, model=model, context=context) for job, policy in zip(live, policies)]
    pools = fleet.pools if fleet else {}
    settings = {job.host: job.settings for job in jobs}
    unpoolable = {host: why for name, pool in pools.items() for host, why in pool_source_problems(
        name, pool.head, {m: (hardware[m], settings[m]) for m in pool.hosts if m in hardware and m in settings}).items()}
    today_pools, _ = plan_pools(pools, [hardware[job.host] for job in live], today, policies, model=model, context=context,
                                unpoolable=unpoolable)
    forced = bool(model or context or what_if)
    served = _served(live, today, today_pools, hardware, fleet, forced)
    out = Outcome()
    shown_pools = {p.pool: p for p in today_pools}
    for job in jobs:
        if job.host in errors:
            out.rows.append(Row(job.host, error=errors[job.host]))
            continue
        fresh = today[live.index(job)]
        answer = served[job.host]
        if isinstance(answer, R1FleetError):  # its hardware no longer matches the lock
            out.rows.append(Row(job.host, fresh, refusal=answer))
            continue
        refusal = deploy_refusal(answer, job.settings, hardware[job.host], settings)
        if answer.pool is not None:
            shown_pools[answer.pool.pool] = answer.pool
            if refusal:
                out.pool_refusals.setdefault(answer.pool.pool, []).append(
                    f"the deploy refuses {job.host}: {_without_host(refusal, job.host)}")
        out.rows.append(Row(job.host, answer.plan, refusal=refusal, note=lock_note(answer, _fleet_ref(fleet)),
                            pooled=answer.pool is not None))
    out.pools = list(shown_pools.values())
    todays = {p.pool: p for p in today_pools}
    for name, locked in {a.pool.pool: a.pool for a in served.values() if isinstance(a, Served) and a.locked and a.pool}.items():
        if name in todays and (note := pool_lock_note(locked, todays[name], _fleet_ref(fleet))):
            out.pool_notes[name] = note
    for pool in out.pools:  # a member of a pool whose lock no longer matches: the pool is refused as the member is
        for row in out.rows:
            if row.refusal and not row.pooled and pool.pooled and row.host in (pool.head, *pool.workers):
                row.pooled = True
                out.pool_refusals.setdefault(pool.pool, []).append(
                    f"the deploy refuses {row.host}: {_without_host(row.refusal, row.host)}")
    return out


def _fleet_ref(fleet: Fleet | None) -> str | None:
    return fleet_lock(fleet.source)[1] if fleet else None


def _served(live: list[Job], today: list[HostPlan], pools: list[PoolPlan], hardware: dict[str, Hardware],
            fleet: Fleet | None, forced: bool) -> dict[str, Served | R1FleetError]:
    """What each host serves: a fleet's hosts as the deploy serves them (its lock included), unless the run forces
    a choice; hosts from probe files, and every host of a forced run, by today's plans."""
    out: dict[str, Served | R1FleetError] = {}
    if fleet is not None and not forced:
        # The plan shown is the planned slot; a rehearsal's stand-in takes it when the deploy runs (and is
        # checked there, r1fleet/deploy/refusals.py).
        hosts = {name: entry.model_copy(update={"rehearsal": False}) for name, entry in fleet.hosts.items()}
        lock, ref = fleet_lock(fleet.source)
        probed = {job.host: hardware[job.host] for job in live if job.in_fleet}
        out.update(served_plans(hosts, fleet.pools, lock, probed, ref))
    for pool in pools:
        if pool.pooled and not any(m in out for m in (pool.head, *pool.workers)):
            for member in (pool.head, *pool.workers):
                job = next(j for j in live if j.host == member)
                try:
                    out[member] = served_in_pool(job.settings.model_copy(update={"rehearsal": False}),
                                                 hardware[member], pool, locked=False)
                except R1FleetError as err:
                    out[member] = err
    for job, plan in zip(live, today):
        out.setdefault(job.host, Served(job.host, plan))
    return out


# ---------------------------------------------------------------- printing


def shown_plan(row: Row) -> HostPlan | None:
    """The row's plan with what the plan's own reasons do not say: served from the lock, refused by the deploy,
    an exposed Ollama's warning."""
    plan = row.plan
    if plan is None:
        return None
    extra = []
    if row.note:
        extra.append(row.note)
    if row.refusal:
        extra.append(f"the deploy refuses this host: {_without_host(row.refusal, row.host)}")
    return plan.model_copy(update={"reasons": [*extra, *plan.reasons]}) if extra else plan


def shown_pool(pool: PoolPlan, out: Outcome) -> PoolPlan:
    """The pool's plan with what its reasons do not say: served from the lock, its members the deploy refuses."""
    notes = [out.pool_notes[pool.pool]] if pool.pool in out.pool_notes else []
    extra = [*notes, *out.pool_refusals.get(pool.pool, [])]
    return pool.model_copy(update={"reasons": [*extra, *pool.reasons]}) if extra else pool


def with_exposure_warning(plan: HostPlan, entry: HostConfig | None) -> HostPlan:
    """An exposed Ollama host's plan says what its allow-list admits (Ollama has no authentication); the deploy's
    refusal of a wider one is the row's refusal."""
    if entry is None or not plan.backend:
        return plan
    try:
        warning = entry.exposure_check(plan.backend, plan.host)
    except R1FleetError:
        return plan
    return plan.model_copy(update={"reasons": [*plan.reasons, warning]}) if warning else plan


def _fmt_devices(plan: HostPlan) -> str:
    return ", ".join(f"{d.device.split(' ')[0]} {d.planned_mib:,}/{d.capacity_mib:,}" for d in plan.devices)


def _fmt_gpus(plan: HostPlan) -> str:
    if plan.unified_memory_mib:
        return f"unified {plan.unified_memory_mib // 1024} GiB"
    if not plan.gpus:
        return "none"
    names = {}
    for g in plan.gpus:
        label = f"{g['name'].replace('NVIDIA ', '').replace('GeForce ', '')} {round(g['memory_total_mib'] / 1024)}G"
        names[label] = names.get(label, 0) + 1
    return ", ".join(f"{n}x {label}" for label, n in names.items())


def _marks(row: Row) -> str:
    p = row.plan
    marks = [m for m, on in (("no fit", p.model and not p.fits), ("locked", row.note), ("refused", row.refusal)) if on]
    return f" ({', '.join(marks)})" if marks else ""


def _row(row: Row, catalog) -> tuple[str, ...]:
    p = row.plan
    if p is None:
        return (row.host, "?", "not planned", "-", "-", "-", "-", "-")
    model = (catalog.find(p.model).size_label if p.model else "-") + _marks(row)
    split = ""
    if p.tensor_split and p.tensor_split_flag:
        blocks = "|".join(str(n) for n in p.tensor_split)
        split = f" -ts {format_flag(p.tensor_split_flag)} (blocks {blocks}+out)"
    return (
        p.host, _fmt_gpus(p), model, (p.backend or "-") + split, str(p.context_length or "-"),
        p.kv_cache_type if p.model else "-", _fmt_devices(p) or "-",
        f"{p.est_tokens_per_second:g}" if p.est_tokens_per_second else "-",
    )


def plans_table(out: Outcome, settings: dict[str, HostConfig | None]) -> str:
    """A table a person reads at a glance (a pooled pool is one row), then each host's and pool's reasons."""
    catalog = load_catalog()
    header = ("HOST", "GPUS", "MODEL", "BACKEND", "CONTEXT", "KV", "MEMORY MiB (planned/capacity)", "TOK/S")
    shown = [r for r in out.rows if not r.pooled]
    rows = [header, *(_row(r, catalog) for r in shown)]
    for pool in out.pools:
        if pool.pooled:
            cells = pool_row(pool, catalog)
            marks = [m for m, on in (("locked", pool.pool in out.pool_notes), ("refused", out.pool_refusals.get(pool.pool)))
                     if on]
            if marks:
                cells = (*cells[:2], f"{cells[2]} ({', '.join(marks)})", *cells[3:])
            rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.append("")
    for r in shown:
        lines.append(f"{r.host}:")
        if r.plan is None:
            lines.append(f"  - not planned: {_without_host(r.error, r.host)}")
            continue
        plan = with_exposure_warning(shown_plan(r), settings.get(r.host))
        lines.extend(f"  - {reason}" for reason in plan.reasons)
    for pool in out.pools:
        lines.append(pool_heading(pool))
        lines.extend(f"  - {reason}" for reason in shown_pool(pool, out).reasons)
    return CONTROLS.sub("", "\n".join(lines))  # a lock's reasons are text from a file, printed to a terminal


def _without_host(err: R1FleetError | None, host: str) -> str:
    """The error under its host's heading, without naming the host again."""
    return str(err).removeprefix(f"host {host}: ")


def _error_doc(host: str, err: R1FleetError) -> dict:
    return {"host": host, "field": err.field, "message": err.message, "fix": err.fix}


def plans_json(out: Outcome, settings: dict[str, HostConfig | None]) -> str:
    hosts = [with_exposure_warning(shown_plan(r), settings.get(r.host)) for r in out.rows if r.plan and not r.pooled]
    doc: dict = {"hosts": [p.model_dump(mode="json") for p in hosts],
                 "pools": [shown_pool(p, out).model_dump(mode="json") for p in out.pools]}
    errors = [_error_doc(r.host, r.error) for r in out.rows if r.error]
    refused = [_error_doc(r.host, r.refusal) for r in out.rows if r.refusal]
    if errors:  # present only when a host could not be planned, so a fleet's plan reads as before
        doc["errors"] = errors
    if refused:
        doc["refused"] = refused
    return json.dumps(doc, indent=2)


def cmd_plan_hosts(args: argparse.Namespace) -> int:
    """Plan the probe files and the fleet's hosts; print the table (or JSON); 0 when every host gets a fitting plan
    the deploy will serve, 1 otherwise."""
    fleet = load_fleet(args.fleet) if args.fleet else None
    jobs = jobs_for(args, fleet)
    what_if = {k: v for k, v in (("flash_attention", args.flash_attention),
                                 ("kv_types", [args.kv_type] if args.kv_type else None)) if v}
    out = plan_jobs(jobs, fleet, args.model, args.context, what_if)
    settings = {job.host: job.settings if job.in_fleet else None for job in jobs}
    print(plans_json(out, settings) if args.json else plans_table(out, settings))
    return 0 if out.ok else 1
