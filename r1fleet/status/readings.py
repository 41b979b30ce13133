"""The status sections of a host's document (r1fleet/status/status.sh, printed after the probe), read into typed
values. Pure: the text in, `Live` out; a section that is missing or garbled becomes a named problem, never an
exception, so one odd host cannot end the report of the others.

Example:
    >>> live = parse_status(document, "lab-4090")
    >>> live.units["r1fleet-ollama.service"].active, live.ollama_ps.status
    ('active', 200)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from r1fleet.hardware._base import split_sections
from r1fleet.net import parse_json
from r1fleet.roles.ollama.decide import PreloadRecord, read_preload_record
from r1fleet.verify.readings import MemoryBreakdown, parse_launchctl_print, parse_memory_breakdown

NO_ANSWER = 0


@dataclass(frozen=True)
class Unit:
    """One unit as `systemctl show` describes it (a unit systemd does not know is `not-found`)."""

    name: str
    load: str = "not-found"
    active: str = "inactive"
    sub: str = ""
    enabled: str = ""
    since: int | None = None  # ActiveEnterTimestamp, seconds since the epoch
    since_text: str = ""  # the timestamp as systemd wrote it, when not as epoch seconds (systemd before 248)
    restarts: int | None = None  # NRestarts: automatic restarts since the unit was last started by hand
    main_pid: int | None = None
    result: str = ""  # why it last stopped: success, signal, exit-code, ...

    @property
    def installed(self) -> bool:
        return self.load == "loaded"


@dataclass(frozen=True)
class Process:
    unit: str
    pid: int
    age_s: int
    name: str


@dataclass(frozen=True)
class PortHolder:
    """A process listening on a backend's port, with the systemd unit it runs in ("-": none)."""

    pid: int
    unit: str
    name: str


@dataclass(frozen=True)
class Reply:
    """One GET made on the host: the HTTP status (0: no answer) and the body, parsed when it is JSON."""

    status: int = NO_ANSWER
    body: Any = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.body is not None


@dataclass(frozen=True)
class Live:
    """What the host's services showed, as read from the document."""

    now: int | None = None  # the host's clock, seconds since the epoch
    units: dict[str, Unit] = field(default_factory=dict)
    processes: tuple[Process, ...] = ()
    launchd: dict[str, Any] | None = None  # a Mac's LaunchDaemon (parse_launchctl_print)
    ollama_version: Reply = Reply()
    ollama_ps: Reply = Reply()
    ollama_tags: Reply = Reply()
    llama_health: Reply = Reply()
    llama_props: Reply = Reply()
    llama_models: Reply = Reply()
    llama_memory: MemoryBreakdown | None = None  # llama-server's memory breakdown at this start (its journal)
    ollama_port: tuple[PortHolder, ...] | None = None  # who listens on Ollama's port (None: not asked)
    ollama_preload: PreloadRecord | None = None  # the last attempt to load Ollama's model after a start
    problems: tuple[str, ...] = ()  # what could not be read, each naming the section

    def unit(self, name: str) -> Unit:
        return self.units.get(name, Unit(name))

    def age(self, pid: int | None) -> int | None:
        for process in self.processes:
            if process.pid == pid:
                return process.age_s
        return None


def _int(text: str) -> int | None:
    """A whole number the host printed, or None: ASCII digits, at most 19 (int() refuses 4300 and more, and
    str.isdecimal() admits other scripts' digits)."""
    text = text.strip()
    return int(text) if re.fullmatch(r"[0-9]{1,19}", text) else None


def parse_units(lines: list[str]) -> dict[str, Unit]:
    """`systemctl show -p ... UNIT...`: one block of `Key=value` lines per unit, blocks apart by a blank line."""
    units: dict[str, Unit] = {}
    block: dict[str, str] = {}
    for line in [*lines, ""]:
        if not line.strip():
            if block.get("Id"):
                since = block.get("ActiveEnterTimestamp", "")
                epoch = _int(since[1:]) if since.startswith("@") else None
                units[block["Id"]] = Unit(
                    name=block["Id"], load=block.get("LoadState", "not-found"), active=block.get("ActiveState", "inactive"),
                    sub=block.get("SubState", ""), enabled=block.get("UnitFileState", ""), since=epoch,
                    since_text="" if epoch is not None else since, restarts=_int(block.get("NRestarts", "")),
                    main_pid=_int(block.get("MainPID", "")) or None, result=block.get("Result", ""),
                )
            block = {}
            continue
        key, sep, value = line.partition("=")
        if sep:
            block[key.strip()] = value.strip()
    return units


def parse_processes(lines: list[str]) -> tuple[Process, ...]:
    """`UNIT PID AGE_S NAME` lines; a line of another shape is skipped."""
    out = []
    for line in lines:
        fields = line.split(None, 3)
        pid, age = (_int(fields[1]), _int(fields[2].removeprefix("-"))) if len(fields) >= 3 else (None, None)
        if pid is not None and age is not None:
            out.append(Process(fields[0], pid, 0 if fields[2].startswith("-") else age, fields[3] if len(fields) > 3 else ""))
    return tuple(out)


def parse_port_holders(lines: list[str]) -> tuple[PortHolder, ...]:
    """`PID UNIT NAME` lines; a line of another shape is skipped."""
    out = []
    for line in lines:
        fields = line.split(None, 2)
        pid = _int(fields[0]) if len(fields) >= 2 else None
        if pid is not None:
            out.append(PortHolder(pid, fields[1], fields[2].strip() if len(fields) > 2 else ""))
    return tuple(out)


def parse_reply(lines: list[str]) -> Reply:
    """A `fetch` section: the body, then the HTTP status on the last line (000: no answer)."""
    if not lines:
        return Reply()
    *body_lines, status_line = lines
    status = _int(status_line)
    if status is None:  # curl missing, or the output cut short
        return Reply(NO_ANSWER, None, "\n".join(lines).strip())
    text = "\n".join(body_lines).strip()
    try:
        body = parse_json(text) if text else None
    except ValueError:  # not plain JSON (NaN, Infinity, nested without end): no answer the status can read
        body = None
    return Reply(status, body, text)


# Each request's section and the path it asked (status.sh), to name it in a problem.
REPLIES = {"ollama-version": "/api/version", "ollama-ps": "/api/ps", "ollama-tags": "/api/tags",
           "llama-health": "/health", "llama-props": "/props", "llama-models": "/v1/models"}


# status.sh frames every line a command prints behind this mark, so no line of a body can pass for a section's mark
FRAME = "|"


def unframed(sections: dict[str, list[str]], problems: list[str]) -> dict[str, list[str]]:
    """The status sections with each line's frame taken off. A line without its frame was not printed through
    status.sh's `framed`: the section is dropped, named in `problems`, rather than read with a line of unknown origin.

    >>> unframed({"status-now": ["|1796678074"], "status-units": ["|Id=a", "MainPID=1"]}, problems := [])
    {'status-now': ['1796678074']}
    >>> problems
    ['section status-units holds a line outside its frame: not read']
    """
    out = {}
    for name, lines in sections.items():
        if not name.startswith("status-"):
            continue
        if any(not line.startswith(FRAME) for line in lines):
            problems.append(f"section {name} holds a line outside its frame: not read")
            continue
        out[name] = [line[len(FRAME):] for line in lines]
    return out


def parse_status(text: str, host: str) -> Live:
    """The status sections of `text` (the probe's sections before them are left to r1fleet.hardware)."""
    problems: list[str] = []
    sections = unframed(split_sections(text, host), problems)
    if "status-units" not in sections and "status-launchd" not in sections:
        problems.append("the status sections are missing: the host's sh stopped before them")
    now = _int(" ".join(sections.get("status-now", [])))
    replies = {name: parse_reply(sections.get(f"status-{name}", [])) for name in REPLIES}
    for name, reply in replies.items():
        if reply.status == 200 and reply.body is None:
            problems.append(f"GET {REPLIES[name]} answered 200 with something that is not JSON: {reply.text[:80]!r}")
        elif reply.text == "curl-missing":
            problems.append("curl is not installed on the host, so its services' APIs cannot be asked (fix: install curl)")
            break
    launchd_lines = sections.get("status-launchd", [])
    launchd = parse_launchctl_print("\n".join(launchd_lines)) if any(line.strip() for line in launchd_lines) else None
    return Live(
        now=now, units=parse_units(sections.get("status-units", [])),
        processes=parse_processes(sections.get("status-procs", [])), launchd=launchd,
        ollama_version=replies["ollama-version"], ollama_ps=replies["ollama-ps"], ollama_tags=replies["ollama-tags"],
        llama_health=replies["llama-health"], llama_props=replies["llama-props"], llama_models=replies["llama-models"],
        llama_memory=parse_memory_breakdown("\n".join(sections.get("status-llama-memory", []))),
        ollama_port=parse_port_holders(sections["status-ollama-port"]) if "status-ollama-port" in sections else None,
        ollama_preload=read_preload_record("\n".join(sections.get("status-ollama-preload", []))),
        problems=tuple(problems),
    )
