"""One host's status: what its service shows (r1fleet/status/readings.py) against what it should serve (its plan,
from r1fleet/lock/served.py through verify's planning) and the fleet lock. Pure: values in, a `HostStatus` out.

The states, worst first: `unreachable` (no SSH), `not deployed` (no r1fleet unit), `failed`, `stopped`, `port taken`
(another program, say Ollama's own ollama.service started again, holds Ollama's port and answers in its place),
`restarting`, `no answer` (the unit runs but its API is silent), `loading`, `idle` (up, the model not in memory:
the next request loads it) and `serving`. Drift is what differs from the lock (or, on a host the lock does not
name, from today's plan), one line each, e.g. `model: serves deepseek-r1:8b, the lock says deepseek-r1:14b`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from r1fleet.lock.file import HostLock
from r1fleet.plan.memory import padded_context
from r1fleet.records import Hardware, HostPlan
from r1fleet.render.systemd_unit import LLAMA_UNIT, OLLAMA_UNIT
from r1fleet.roles.exposure.endpoint import Endpoint
from r1fleet.roles.gpu_driver.decide import waiting_for_reboot
from r1fleet.roles.macos.decide import LABEL as MACOS_LABEL
from r1fleet.roles.ollama.decide import PRELOAD_UNIT, preload_problem
from r1fleet.roles.rpc_worker.decide import RPC_UNIT
from r1fleet.status.readings import Live, Reply, Unit
from r1fleet.verify.judge import memory_problems, memory_summary

UNITS = {"ollama": OLLAMA_UNIT, "llama.cpp": LLAMA_UNIT, "worker": RPC_UNIT}
BACKEND_OF = {OLLAMA_UNIT: "ollama", LLAMA_UNIT: "llama.cpp", RPC_UNIT: "rpc-server"}
DOWN = ("unreachable", "not deployed", "failed", "stopped", "port taken", "waiting for reboot")  # shown as one line: the state and its reason
GOOD = ("serving",)


@dataclass(frozen=True)
class DeviceUse:
    device: str  # as the plan names it, e.g. "GPU0 NVIDIA GeForce RTX 4090"
    used_mib: int | None  # what r1fleet's service holds there (None: the probe cannot tell)
    planned_mib: int


@dataclass
class HostStatus:
    host: str
    state: str
    reason: str | None = None  # for a host that is down or not deployed: why, and the fix
    backend: str | None = None
    version: str | None = None
    model: str | None = None  # the name a client sends (what is loaded, else what is planned)
    stands_for: str | None = None  # in rehearsal: the distill the stand-in holds the slot for
    loaded: bool | None = None
    loaded_for_s: int | None = None
    context: int | None = None
    devices: list[DeviceUse] = field(default_factory=list)
    endpoint: Endpoint | None = None
    unit: str | None = None
    unit_state: str | None = None  # ActiveState (SubState)
    unit_for_s: int | None = None  # since the unit was last (re)started
    unit_since: int | None = None  # the same, as seconds since the epoch
    restarts: int | None = None  # automatic restarts (a crash loop shows here)
    locked: bool = False
    drift: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    llama_memory: str | None = None  # llama.cpp's own account at this start against the plan (verify's judge)
    role: str = "alone"
    pool: str | None = None

    @property
    def healthy(self) -> bool:
        return self.state in GOOD and not self.drift and not self.problems

    def document(self) -> dict[str, Any]:
        """The host as `r1fleet status --json` prints it."""
        return {
            "host": self.host, "state": self.state, "reason": self.reason, "backend": self.backend,
            "version": self.version, "model": self.model, "stands_for": self.stands_for, "loaded": self.loaded,
            "loaded_for_s": self.loaded_for_s, "context": self.context,
            "devices": [{"device": d.device, "used_mib": d.used_mib, "planned_mib": d.planned_mib} for d in self.devices],
            "endpoint": self.endpoint.document() if self.endpoint else None,
            "unit": {"name": self.unit, "state": self.unit_state, "for_s": self.unit_for_s,
                     "since": iso(self.unit_since), "restarts": self.restarts} if self.unit else None,
            "lock": "locked" if self.locked else "not locked", "drift": self.drift, "problems": self.problems,
            "llama_memory": self.llama_memory,
            "role": self.role, "pool": self.pool, "healthy": self.healthy,
        }


def iso(epoch: int | None) -> str | None:
    try:
        return None if epoch is None else datetime.fromtimestamp(epoch, timezone.utc).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):  # a clock (or a line) past what a datetime holds
        return None


def unreachable(host: str, reason: str) -> HostStatus:
    return HostStatus(host, "unreachable", reason=reason)


# ---------------------------------------------------------------- what the service shows


@dataclass(frozen=True)
class Seen:
    """The service's own answers, read the same way for both backends."""

    answers: bool = False  # its API answered at all
    loading: bool = False
    version: str | None = None
    loaded: tuple[str, ...] = ()  # model names in memory
    present: tuple[str, ...] | None = None  # model names on disk (Ollama's /api/tags); None: not asked
    digests: dict[str, str] = field(default_factory=dict)  # name -> manifest sha256 (Ollama)
    context: int | None = None
    model_path: str | None = None
    ram_mib: int | None = None  # Ollama's /api/ps: the loaded model's size outside GPU memory
    vram_mib: int | None = None  # ... and in it


def _models(reply: Reply, key: str = "models") -> list[dict]:
    body = reply.body if reply.ok else None
    items = body.get(key) if isinstance(body, dict) else None
    return [m for m in items or [] if isinstance(m, dict)]


def seen_ollama(live: Live) -> Seen:
    version = live.ollama_version.body.get("version") if live.ollama_version.ok and isinstance(live.ollama_version.body, dict) else None
    loaded = _models(live.ollama_ps)
    tags = _models(live.ollama_tags)
    context = next((m.get("context_length") for m in loaded if isinstance(m.get("context_length"), int)), None)
    sizes = [(m.get("size"), m.get("size_vram")) for m in loaded]
    sizes = [(size, vram) for size, vram in sizes if isinstance(size, int) and isinstance(vram, int)]
    mib = 1024 * 1024
    return Seen(
        answers=live.ollama_version.status == 200 or live.ollama_ps.status == 200,
        version=str(version) if version else None,
        loaded=tuple(str(m.get("name")) for m in loaded if m.get("name")),
        present=tuple(str(m.get("name")) for m in tags if m.get("name")) if live.ollama_tags.ok else None,
        digests={str(m["name"]): str(m.get("digest")) for m in tags if m.get("name") and m.get("digest")},
        context=context,
        ram_mib=sum(size - vram for size, vram in sizes) // mib if sizes else None,
        vram_mib=sum(vram for _, vram in sizes) // mib if sizes else None,
    )


def seen_llama(live: Live) -> Seen:
    health, props = live.llama_health, live.llama_props
    body = props.body if props.ok and isinstance(props.body, dict) else {}
    settings = body.get("default_generation_settings") if isinstance(body.get("default_generation_settings"), dict) else {}
    context = settings.get("n_ctx") or body.get("n_ctx")
    ids = tuple(str(m.get("id")) for m in _models(live.llama_models, "data") if m.get("id"))
    ok = health.status == 200
    return Seen(
        answers=health.status != 0, loading=health.status == 503,
        version=str(body["build_info"]) if body.get("build_info") else None,
        loaded=(ids or ((str(body["model_alias"]),) if body.get("model_alias") else ())) if ok else (),
        context=context if isinstance(context, int) else None, model_path=body.get("model_path"),
    )


# ---------------------------------------------------------------- drift


def drift_of(plan: HostPlan, running: str | None, seen: Seen, locked: bool, lock: HostLock | None) -> list[str]:
    """What the live host shows that its lock (or, unlocked, its plan) does not say, one line each."""
    says = "the lock says" if locked else "the plan says"
    out = []
    if running and plan.backend and running != plan.backend:
        out.append(f"backend: runs {running}, {says} {plan.backend}")
        return out  # every other reading belongs to the other backend
    tag = plan.ollama_tag
    if tag and seen.loaded and tag not in seen.loaded:
        out.append(f"model: serves {', '.join(seen.loaded)}, {says} {tag}")
    elif tag and seen.present is not None and tag not in seen.present:
        out.append(f"model: {tag} is not on the host ({says} it serves it)")
    if seen.context and plan.context_length and tag in seen.loaded:
        want = padded_context(plan.context_length) if plan.backend == "llama.cpp" else plan.context_length
        if seen.context != want:
            out.append(f"context: {seen.context}, {says} {want}")
    if locked and lock is not None:
        artifacts = lock.artifacts
        if plan.backend == "ollama" and artifacts.ollama and seen.version and seen.version != artifacts.ollama.version:
            out.append(f"Ollama: version {seen.version}, the lock says {artifacts.ollama.version}")
        locked_manifest = artifacts.model.manifest_for(tag) if artifacts.model else None
        if locked_manifest and tag in seen.digests and seen.digests[tag] != locked_manifest:
            out.append(f"model: {tag} has manifest sha256 {seen.digests[tag][:12]}, the lock says {locked_manifest[:12]}")
        llama = artifacts.llama_cpp
        if (plan.backend == "llama.cpp" and llama and llama.method == "source" and llama.build and seen.version
                and seen.version.split("-")[0] != llama.build):
            out.append(f"llama.cpp: build {seen.version}, the lock says {llama.build}")
    return out


# ---------------------------------------------------------------- GPU memory


_GPU_INDEX = re.compile(r"GPU(\d+) ")


def device_use(plan: HostPlan, hardware: Hardware | None, seen: Seen | None = None) -> list[DeviceUse]:
    """Each planned device: the memory r1fleet's service holds there (its own processes on that GPU, from the
    probe's nvidia-smi; the GPU's whole use where nvidia-smi lists no processes) against the plan's. System RAM
    and unified memory have no per-process reading in the probe: there Ollama's own account (/api/ps) counts."""
    gpus = {g.index: g for g in hardware.gpus} if hardware else {}
    out = []
    for device in plan.devices:
        match = _GPU_INDEX.match(device.device)
        used = None
        if match and int(match.group(1)) in gpus:
            gpu = gpus[int(match.group(1))]
            used = sum(p.used_mib for p in gpu.processes if p.own) if gpu.processes else gpu.memory_used_mib
        elif seen is not None and device.device.startswith("RAM"):
            used = seen.ram_mib
        elif seen is not None and device.device.startswith("unified"):
            used = seen.vram_mib
        out.append(DeviceUse(device.device, used, device.planned_mib))
    return out


# ---------------------------------------------------------------- the host


def _unit_state(unit: Unit) -> str:
    return f"{unit.active} ({unit.sub})" if unit.sub else unit.active


def _ages(live: Live, since: int | None) -> int | None:
    return max(0, live.now - since) if live.now is not None and since is not None else None


def _loaded_for(live: Live, unit: Unit, backend: str) -> int | None:
    """How long the model has been in memory: Ollama's runner process (the model is loaded when it starts), or
    llama-server itself, which loads its one model at start."""
    if backend == "ollama":
        runners = [p.age_s for p in live.processes if p.unit == unit.name and p.pid != unit.main_pid]
        return max(runners) if runners else None
    return live.age(unit.main_pid)


def _installed(live: Live) -> list[Unit]:
    return [live.unit(name) for name in (OLLAMA_UNIT, LLAMA_UNIT, RPC_UNIT) if live.unit(name).installed]


def host_status(host: str, live: Live, plan: HostPlan | None = None, *, plan_error: str | None = None,
                locked: bool = False, lock: HostLock | None = None, role: str = "alone", pool: str | None = None,
                hardware: Hardware | None = None, endpoint: Endpoint | None = None) -> HostStatus:
    """The host's status from what it showed (`live`) and what it should serve (`plan`, or why there is none)."""
    status = HostStatus(host, "serving", endpoint=endpoint, locked=locked, role=role, pool=pool,
                        problems=list(live.problems))
    if plan is not None:
        status.model, status.stands_for = plan.ollama_tag, plan.target_model if plan.rehearsal else None
        status.backend = plan.backend if role != "worker" else "rpc-server"
    if plan_error:
        status.drift.append(plan_error)
    if hardware is not None and (waiting := _driver_waiting(hardware)):
        status.state = "waiting for reboot"
        status.reason = (f"NVIDIA driver {waiting} is installed and loads at the next reboot, which r1fleet left to you "
                         f"(fix: reboot {host}, then pyinfra inventory.py deploy.py --limit {host})")
        return status
    if live.launchd is not None or (plan is not None and plan.vendor == "apple"):
        return _mac_status(status, live, plan, lock)
    installed = _installed(live)
    wanted = UNITS["worker" if role == "worker" else (plan.backend if plan is not None and plan.backend else "ollama")]
    unit = live.unit(wanted) if live.unit(wanted).installed else next(
        (u for u in installed if u.active == "active"), installed[0] if installed else None)
    if unit is None:
        status.state = "not deployed"
        planned = f"; the plan serves {plan.ollama_tag} with {plan.backend}" if plan is not None and plan.fits else ""
        status.reason = (f"no r1fleet service on this host{planned} "
                         f"(fix: pyinfra inventory.py deploy.py --limit {host})")
        return status
    status.unit, status.unit_state, status.restarts = unit.name, _unit_state(unit), unit.restarts
    status.unit_since, status.unit_for_s = unit.since, _ages(live, unit.since)
    running = BACKEND_OF[unit.name]
    status.backend = running if role != "worker" else "rpc-server"
    if unit.active == "failed":
        status.state, status.reason = "failed", (f"{unit.name} failed ({unit.result or 'no result'}) "
                                                 f"(fix: journalctl -u {unit.name} on {host}, then redeploy)")
    elif unit.active in ("activating", "reloading") and unit.sub == "auto-restart":
        status.state = "restarting"
        status.problems.append(f"{unit.name} stopped ({unit.result}) and systemd is restarting it")
    elif unit.active != "active":
        status.state, status.reason = "stopped", (f"{unit.name} is {unit.active} "
                                                  f"(fix: systemctl start {unit.name} on {host}, or redeploy)")
    # Whatever state r1fleet's unit is in (it cannot bind a port that is taken), the holder is what to fix.
    foreign = [h for h in live.ollama_port or () if h.unit != OLLAMA_UNIT] if running == "ollama" else []
    if foreign:
        holder = foreign[0]
        status.state, status.reason = "port taken", (
            f"another {holder.name or 'program'} (pid {holder.pid}, {'unit ' + holder.unit if holder.unit != '-' else 'no unit'}) "
            f"holds Ollama's port, not {OLLAMA_UNIT}, and answers in its place "
            f"(fix: systemctl disable --now {holder.unit if holder.unit != '-' else 'it'} on {host}, then redeploy: "
            "the deploy masks Ollama's own ollama.service)")
    if status.state in DOWN or running == "rpc-server":  # a worker's rpc-server answers no HTTP
        return status
    seen = seen_ollama(live) if running == "ollama" else seen_llama(live)
    status.version = seen.version
    if seen.loaded:
        status.model = seen.loaded[0] if plan is None or plan.ollama_tag not in seen.loaded else plan.ollama_tag
    status.loaded = bool(seen.loaded) if seen.answers else None
    status.context = seen.context
    if status.loaded:
        status.loaded_for_s = _loaded_for(live, unit, running)
    if status.state == "serving":
        if not seen.answers:
            status.state = "no answer"
            status.problems.append(f"{unit.name} runs, but its API does not answer on the host")
        elif seen.loading:
            status.state = "loading"
        elif not seen.loaded:
            status.state = "idle"
            if running == "ollama" and plan is not None and plan.ollama_tag:
                _ollama_preload(status, live, plan.ollama_tag)
    if plan is not None:
        status.devices = device_use(plan, hardware, seen)
        status.drift += drift_of(plan, running, seen, locked, lock)
        if running == "llama.cpp" and live.llama_memory is not None:
            status.llama_memory = memory_summary(plan, live.llama_memory)
            status.problems += memory_problems(plan, live.llama_memory)
    return status


def _driver_waiting(hardware: Hardware) -> str | None:
    """The driver version the host waits to load: r1fleet recorded its reboot in this boot and no driver answers."""
    if any(g.vendor == "nvidia" and g.driver_version for g in hardware.gpus):
        return None
    return waiting_for_reboot(hardware.driver.reboot_marker, hardware.driver.boot_id)


def _ollama_preload(status: HostStatus, live: Live, tag: str) -> None:
    """An Ollama host without its model: loading it (the preload unit runs), or why not (its last attempt)."""
    preload = live.unit(PRELOAD_UNIT)
    if not preload.installed:  # deployed before the preload unit: the next request loads it
        return
    if preload.active in ("active", "activating"):
        status.state = "loading"
        return
    status.problems.append(preload_problem(tag, live.ollama_preload, False))


def _mac_status(status: HostStatus, live: Live, plan: HostPlan | None, lock: HostLock | None) -> HostStatus:
    """A Mac serves Ollama as a LaunchDaemon (r1fleet/roles/macos): launchd's word for its state."""
    job = live.launchd or {}
    status.unit, status.backend = MACOS_LABEL, "ollama"
    if not job.get("state"):
        status.state = "not deployed"
        status.reason = f"no r1fleet LaunchDaemon on this host (fix: pyinfra inventory.py deploy.py --limit {status.host})"
        return status
    status.unit_state = str(job["state"])
    if job["state"] != "running":
        status.state, status.reason = "stopped", f"{MACOS_LABEL} is {job['state']} (fix: redeploy)"
        return status
    seen = seen_ollama(live)
    status.version, status.loaded, status.context = seen.version, bool(seen.loaded) if seen.answers else None, seen.context
    if not seen.answers:
        status.state = "no answer"
    elif not seen.loaded:
        status.state = "idle"
    if plan is not None:
        status.drift += drift_of(plan, "ollama", seen, status.locked, lock)
    return status
