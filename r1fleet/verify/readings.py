"""What a host's service manager and sockets say, read from raw command output: `ss` and `lsof` listeners,
`systemctl show` values, `launchctl print`. Pure; the verify suite runs the commands.

Example:
    >>> listeners = parse_ss_listeners('LISTEN 0 4096 0.0.0.0:11434 0.0.0.0:* users:(("ollama",pid=7,fd=3))')
    >>> listener_problems(listeners, service_pids={7}, bind="127.0.0.1", port=11434)
    ['0.0.0.0:11434 is open (process ollama): the plan allows 127.0.0.1:11434 only']
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from r1fleet.net import is_loopback

WILDCARDS = {"0.0.0.0", "::", "*"}


# ---------------------------------------------------------------- listeners (`ss -ltnpH`)


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    pids: tuple[int, ...] = ()
    process: str = ""

    @property
    def endpoint(self) -> str:
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


_USERS = re.compile(r'\("([^"]*)",pid=(\d+)')


def _split_endpoint(text: str) -> tuple[str, int] | None:
    address, sep, port = text.rpartition(":")
    if not sep or not port.isdecimal():
        return None
    address = address.strip("[]").split("%", 1)[0]  # [::1]:80, 127.0.0.53%lo:53
    if address.startswith("::ffff:") and "." in address:
        address = address.removeprefix("::ffff:")
    return address, int(port)


def parse_ss_listeners(text: str) -> list[Listener]:
    """TCP listeners from `ss -ltnpH` (or `ss -ltnp`, whose header line is skipped)."""
    listeners = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[0] != "LISTEN":
            continue
        endpoint = _split_endpoint(fields[3])
        if endpoint is None:
            continue
        users = _USERS.findall(line)
        listeners.append(Listener(endpoint[0], endpoint[1], tuple(int(pid) for _, pid in users), users[0][0] if users else ""))
    return listeners


def listener_problems(listeners: list[Listener], service_pids: set[int], bind: str, port: int,
                      units: dict[int, str] | None = None) -> list[str]:
    """Why the service's sockets differ from the plan (empty list: exactly as planned).

    The planned socket must be there, held by the service (another program there, say Ollama's own
    ollama.service started again, answers in its place: named with its pid and, from `units`, its unit),
    nothing may listen on the service port at another address, and the service's own processes may only
    open extra ports on loopback (Ollama's runners do).
    """
    planned = f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"
    problems = []
    ours = [lis for lis in listeners if set(lis.pids) & service_pids] if service_pids else []
    # A wildcard socket also answers on the planned address; it is reported below as too open.
    at_plan = [lis for lis in listeners if lis.port == port and (lis.address == bind or lis.address in WILDCARDS)]
    if not at_plan:
        problems.append(f"nothing listens on {planned}")
    elif not any(set(lis.pids) & service_pids for lis in at_plan):
        holder = at_plan[0]
        pids = ", ".join(f"pid {pid}" + (f", {units[pid]}" if units and units.get(pid) else "") for pid in holder.pids)
        owner = (holder.process or "another program") + (f" ({pids})" if pids else "")
        problems.append(f"{planned} is held by {owner}, not by the service")
    for lis in listeners:
        if lis.port == port and lis.address != bind:
            who = f" (process {lis.process})" if lis.process else ""
            problems.append(f"{lis.endpoint} is open{who}: the plan allows {planned} only")
    for lis in ours:
        if lis.port != port and not is_loopback(lis.address):
            problems.append(f"the service also listens on {lis.endpoint}; only {planned} and loopback runner ports are expected")
    return problems


def parse_launchctl_print(text: str) -> dict[str, Any]:
    """`launchctl print system/LABEL` -> {"state", "pid", "path", "environment"}.

    The format is launchd's own description of a job (launchctl(1) `print`; Apple does not specify it, so
    only what every macOS since 10.10 prints is read): `key = value` lines one level in, and an
    `environment = { KEY => VALUE }` block. Deeper `state = ...` lines (endpoints) are not the job's state."""
    info: dict[str, Any] = {"state": None, "pid": None, "path": None, "environment": {}}
    block = None
    for line in text.splitlines():
        depth = len(line) - len(line.lstrip("\t")) if line.startswith("\t") else (len(line) - len(line.lstrip(" "))) // 4
        body = line.strip()
        if depth == 1:
            block = None
            key, sep, value = body.partition(" = ")
            if not sep:
                continue
            if value == "{":
                block = key
            elif key == "state":
                info["state"] = value
            elif key == "pid" and value.isdecimal():
                info["pid"] = int(value)
            elif key == "path":
                info["path"] = value
        elif depth == 2 and block == "environment" and " => " in body:
            name, _, value = body.partition(" => ")
            info["environment"][name] = value
    return info


def launchd_disabled(text: str, label: str) -> bool:
    """Whether `launchctl print-disabled system` marks `label` disabled (`=> disabled`, or `=> true` on
    older macOS, where the value answered "is it disabled")."""
    for line in text.splitlines():
        name, sep, value = line.strip().partition(" => ")
        if sep and name.strip('"') == label:
            return value.strip() in ("disabled", "true")
    return False


def parse_lsof_listeners(text: str) -> list[Listener]:
    """TCP listeners from `lsof -nP -iTCP -sTCP:LISTEN -Fpcn` (macOS has no ss): `p<pid>`, `c<command>`,
    `n<address>:<port>` field lines (lsof(8) OUTPUT FOR OTHER PROGRAMS); `*` is every address."""
    listeners, pid, command = [], 0, ""
    for line in text.splitlines():
        tag, value = line[:1], line[1:].strip()
        if tag == "p" and value.isdecimal():
            pid, command = int(value), ""
        elif tag == "c":
            command = value
        elif tag == "n":
            endpoint = _split_endpoint(value.replace("*:", "0.0.0.0:", 1) if value.startswith("*:") else value)
            if endpoint:
                listeners.append(Listener(endpoint[0], endpoint[1], (pid,) if pid else (), command))
    return listeners


def cgroup_unit(text: str) -> str | None:
    """The systemd unit a process runs in, from its /proc/PID/cgroup: the unified hierarchy's line (`0::`) first,
    else systemd's own v1 one (`name=systemd`), the first whose path ends in a unit, e.g. `ollama.service`. (On a
    hybrid host the v1 line may name no unit: systemd tracks its units on the unified one.)"""
    lines = [line.split(":", 2) for line in text.splitlines() if line.count(":") >= 2]
    for wanted in (("0", ""), (None, "name=systemd")):
        for hierarchy, controllers, path in lines:
            if controllers == wanted[1] and (wanted[0] is None or hierarchy == wanted[0]):
                name = path.rstrip("/").rsplit("/", 1)[-1]
                if re.fullmatch(r"[\w@.:-]+\.(service|scope)", name):
                    return name
    return None


def exec_start_argv(text: str) -> list[str]:
    """The argv of `systemctl show -p ExecStart --value UNIT` ("{ path=... ; argv[]=A B C ; ... }")."""
    match = re.search(r"argv\[\]=(.*?) ;", text)
    return match.group(1).split() if match else []


def flag_value(argv: list[str], *names: str) -> str | None:
    for i, word in enumerate(argv):
        for name in names:
            if word == name and i + 1 < len(argv):
                return argv[i + 1]
            if word.startswith(name + "="):
                return word.split("=", 1)[1]
    return None




# ---------------------------------------------------------------- llama-server's memory breakdown


@dataclass(frozen=True)
class DeviceMemory:
    """One row of llama.cpp's memory breakdown, in MiB (each figure truncated by llama.cpp): a device's
    `total = free + (self = model + context + compute) + unaccounted`; a host row has no total, free or unaccounted."""

    name: str  # CUDA0, RPC0, Host
    description: str = ""  # RTX 3090, 127.0.0.1:50100
    self_mib: int = 0
    model_mib: int = 0
    context_mib: int = 0
    compute_mib: int = 0
    total_mib: int | None = None
    free_mib: int | None = None
    unaccounted_mib: int | None = None


@dataclass(frozen=True)
class MemoryBreakdown:
    """llama-server's own account of its memory at one start, device by device in llama.cpp's order, then the
    host's buffers (token embeddings, the CPU's compute buffer; on a CPU plan everything)."""

    devices: tuple[DeviceMemory, ...] = ()
    host: DeviceMemory | None = None
    problems: tuple[str, ...] = ()  # rows of the table that could not be read


# The table llama.cpp prints with common_memory_breakdown_print (common/fit.cpp:906-1086 at 0c1e570: the row
# templates at 921-923, the header `memory breakdown [MiB]` at 925), once per dry run of its --fit pre-pass and once
# when llama-server stops (tools/server/server.cpp:550-553), at log level 4 (LOG_TRC). Each line in the journal:
#   0.00.106.105 I common_memory_breakdown_print: |   - RPC0 (127.0.0.1:50100) | 24105 = 24105 + ( 180 =    31 +      90 +      59) +        -180 |
#   0.00.106.105 I common_memory_breakdown_print: |   - Host                   |                    72 =    28 +       0 +      43                |
_BREAKDOWN = "common_memory_breakdown_print:"
_NUM = r"(-?[0-9]{1,12})"
_DEVICE_ROW = re.compile(
    rf"^\|\s*-\s+(?P<label>.+?)\s*\|\s*{_NUM}\s*=\s*{_NUM}\s*\+\s*\(\s*{_NUM}\s*=\s*{_NUM}\s*\+\s*{_NUM}\s*\+\s*{_NUM}\s*\)"
    rf"\s*\+\s*{_NUM}\s*\|\s*$")
_OTHER_ROW = re.compile(rf"^\|\s*-\s+(?P<label>.+?)\s*\|\s*{_NUM}\s*=\s*{_NUM}\s*\+\s*{_NUM}\s*\+\s*{_NUM}\s*\|\s*$")
_LABEL = re.compile(r"^(?P<name>\S+)(?:\s+\((?P<description>.*)\))?$")


def _label(text: str) -> tuple[str, str]:
    match = _LABEL.match(text)
    return (match["name"], match["description"] or "") if match else (text, "")


def parse_memory_breakdown(log: str) -> MemoryBreakdown | None:
    """The first memory breakdown in a llama-server log (one start's journal: its --fit pre-pass's projection of the
    parameters it was given, which r1fleet's units set in full, so it is what the start allocates); None when the log
    holds none. Total: a row that does not read is named in `problems`, never an exception."""
    devices: list[DeviceMemory] = []
    host: DeviceMemory | None = None
    problems: list[str] = []
    started = False
    for line in log.splitlines():
        at = line.find(_BREAKDOWN)
        if at < 0:
            continue  # another thread's line between the table's rows
        row = line[at + len(_BREAKDOWN):].strip()
        if "memory breakdown [MiB]" in row:
            if started:
                break  # a later table (another dry run, or the one printed at stop)
            started = True
            continue
        if not started:
            continue
        device = _DEVICE_ROW.match(row)
        other = _OTHER_ROW.match(row) if device is None else None
        if device is not None:
            name, description = _label(device["label"])
            total, free, self_mib, model, context, compute, unaccounted = (int(device[i]) for i in range(2, 9))
            devices.append(DeviceMemory(name, description, self_mib, model, context, compute, total, free, unaccounted))
        elif other is not None:
            name, description = _label(other["label"])
            self_mib, model, context, compute = (int(other[i]) for i in range(2, 6))
            if name == "Host":
                host = DeviceMemory(name, description, self_mib, model, context, compute)
            # other buffer types (neither a device nor the host's) hold no planned memory
        else:
            problems.append(f"an unreadable row of llama-server's memory breakdown: {row[:120]!r}")
    if not started:
        return None
    return MemoryBreakdown(tuple(devices), host, tuple(problems))
