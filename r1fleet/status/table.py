"""`r1fleet status` as a person reads it: one row per host (a host that is down or not deployed: one line, its
state and the reason), then what drifted from the lock and any other problem, one line each."""

from __future__ import annotations

from r1fleet.probe.text import CONTROLS
from r1fleet.status.report import DOWN, HostStatus

HEADER = ("HOST", "STATE", "BACKEND", "MODEL", "LOADED", "GPU MiB used/planned", "ENDPOINT", "UNIT", "LOCK")


def age(seconds: int | None) -> str:
    """12s, 5m, 3h, 2d: how long ago, at a glance."""
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _model(s: HostStatus) -> str:
    if not s.model:
        return "-"
    return f"{s.model} (for {s.stands_for})" if s.stands_for else s.model


def _loaded(s: HostStatus) -> str:
    if s.loaded is None:
        return "-"
    if not s.loaded:
        return "no"
    return f"{age(s.loaded_for_s)} ago" if s.loaded_for_s is not None else "yes"


def _devices(s: HostStatus) -> str:
    parts = []
    for d in s.devices:
        name = d.device.split(" ", 1)[0]
        used = "?" if d.used_mib is None else f"{d.used_mib:,}"
        parts.append(f"{name} {used}/{d.planned_mib:,}")
    return ", ".join(parts) or "-"


def _endpoint(s: HostStatus) -> str:
    e = s.endpoint
    if e is None:
        return f"rpc-server for {s.pool}" if s.role == "worker" else "-"
    where = "" if e.lan else " (host only)"
    key = f" key {e.key_where}" if e.key_needed else ""
    return f"{e.url}{where}{key}"


def _unit(s: HostStatus) -> str:
    if not s.unit_state:
        return "-"
    state = s.unit_state.split(" ", 1)[0]
    since = f" {age(s.unit_for_s)}" if s.unit_for_s is not None else ""
    restarts = f", {s.restarts} restart{'s' if s.restarts > 1 else ''}" if s.restarts else ""
    return f"{state}{since}{restarts}"


def _lock(s: HostStatus) -> str:
    if s.drift:
        return "DRIFT" if s.locked else "not locked, differs"
    return "matches" if s.locked else "not locked"


def status_table(statuses: list[HostStatus]) -> str:
    rows = [HEADER]
    down = []
    for s in statuses:
        if s.state in DOWN:
            down.append(s)
            continue
        backend = f"{s.backend} {s.version}" if s.backend and s.version else (s.backend or "-")
        rows.append((s.host, s.state, backend, _model(s), _loaded(s), _devices(s), _endpoint(s), _unit(s), _lock(s)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    for s in down:  # one line each: the state, then the reason (it names the fix)
        lines.append(f"{s.host.ljust(widths[0])}  {s.state}: {s.reason}")
    notes = [f"{s.host}: {line}" for s in statuses for line in (*s.drift, *s.problems)]
    notes += [f"{s.host}: llama.cpp's own account at this start, MiB used/allowed by the plan: {s.llama_memory}"
              for s in statuses if s.llama_memory and s.state not in DOWN]
    if notes:
        lines.append("")
        lines.extend(notes)
    healthy = sum(1 for s in statuses if s.healthy)
    lines.append("")
    lines.append(f"{healthy}/{len(statuses)} hosts serving as planned")
    # a host's answers are JSON, whose \u001b is a real ESC once decoded: no cell may command the terminal
    return CONTROLS.sub("", "\n".join(lines))
