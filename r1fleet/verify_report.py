"""The pure side of `r1fleet verify`: read what a host shows, judge it against its plan, print the table.

Nothing here touches a host. The testinfra suite (r1fleet/verify_suite/) runs commands over SSH and hands
their raw output to these functions, so every judgement (which listener is too open, which GPU is
missing, whether a split or a speed is off) is unit tested with real output formats.

Example:
    >>> listeners = parse_ss_listeners('LISTEN 0 4096 0.0.0.0:11434 0.0.0.0:* users:(("ollama",pid=7,fd=3))')
    >>> listener_problems(listeners, service_pids={7}, bind="127.0.0.1", port=11434)
    ['0.0.0.0:11434 is open (process ollama): the plan allows 127.0.0.1:11434 only']
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from r1fleet.net import is_loopback
from r1fleet.hardware import parse_nvidia_apps
from r1fleet.models import HostPlan

WILDCARDS = {"0.0.0.0", "::", "*"}
RESULT_PASS = "PASS"
RESULT_FAIL = "FAIL"


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


def listener_problems(listeners: list[Listener], service_pids: set[int], bind: str, port: int) -> list[str]:
    """Why the service's sockets differ from the plan (empty list: exactly as planned).

    The planned socket must be there, nothing may listen on the service port at another address,
    and the service's own processes may only open extra ports on loopback (Ollama's runners do).
    """
    planned = f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"
    problems = []
    ours = [lis for lis in listeners if set(lis.pids) & service_pids] if service_pids else []
    # A wildcard socket also answers on the planned address; it is reported below as too open.
    at_plan = [lis for lis in listeners if lis.port == port and (lis.address == bind or lis.address in WILDCARDS)]
    if not at_plan:
        problems.append(f"nothing listens on {planned}")
    elif service_pids and not any(set(lis.pids) & service_pids for lis in at_plan):
        owner = at_plan[0].process or "another program"
        problems.append(f"{planned} is held by {owner}, not by the service")
    for lis in listeners:
        if lis.port == port and lis.address != bind:
            who = f" (process {lis.process})" if lis.process else ""
            problems.append(f"{lis.endpoint} is open{who}: the plan allows {planned} only")
    for lis in ours:
        if lis.port != port and not is_loopback(lis.address):
            problems.append(f"the service also listens on {lis.endpoint}; only {planned} and loopback runner ports are expected")
    return problems


# ---------------------------------------------------------------- GPUs (`nvidia-smi`)


@dataclass(frozen=True)
class VisibleGpu:
    index: int
    name: str
    uuid: str
    driver_version: str


def parse_gpu_query(text: str) -> list[VisibleGpu]:
    """`nvidia-smi --query-gpu=index,name,uuid,driver_version --format=csv,noheader,nounits`."""
    gpus = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4 and parts[0].isdecimal():
            gpus.append(VisibleGpu(int(parts[0]), parts[1], parts[2], parts[3]))
    return gpus


def gpu_problems(plan: HostPlan, visible: list[VisibleGpu]) -> list[str]:
    """Planned GPUs that the driver does not show (by UUID when planned by UUID, else by index and name)."""
    if not visible:
        return ["nvidia-smi shows no GPU: the driver is not loaded or the GPUs are gone"]
    problems = []
    if not all(g.driver_version and g.driver_version not in ("[N/A]", "N/A") for g in visible):
        problems.append("nvidia-smi reports no driver version")
    by_uuid = {g.uuid: g for g in visible}
    for uuid in plan.gpu_uuids:
        if uuid not in by_uuid:
            problems.append(f"planned GPU {uuid} is not visible (visible: {', '.join(by_uuid) or 'none'})")
    by_index = {g.index: g for g in visible}
    for planned in plan.gpus:
        seen = by_index.get(int(planned["index"]))
        if seen is None:
            problems.append(f"GPU{planned['index']} {planned['name']} is not visible")
        elif seen.name != planned["name"]:
            problems.append(f"GPU{planned['index']} is {seen.name}, the plan has {planned['name']}")
    if len(visible) < max(len(plan.gpus), len(plan.gpu_uuids)):
        problems.append(f"{len(visible)} GPUs visible, the plan has {max(len(plan.gpus), len(plan.gpu_uuids))}")
    return problems


@dataclass(frozen=True)
class ComputeApp:
    gpu_uuid: str
    pid: int
    name: str
    used_mib: int


def parse_compute_apps(text: str) -> list[ComputeApp]:
    """`nvidia-smi --query-compute-apps=gpu_uuid,pid,process_name,used_memory --format=csv,noheader,nounits`,
    read by the probe's own parser (r1fleet.hardware)."""
    return [
        ComputeApp(uuid, process.pid, process.name, process.used_mib)
        for uuid, processes in parse_nvidia_apps(text.splitlines()).items()
        for process in processes
    ]


def memory_by_gpu(apps: list[ComputeApp], pids: set[int], gpu_order: list[str]) -> list[int]:
    """MiB the given processes hold on each GPU, in `gpu_order` (UUIDs, as the plan lists them)."""
    totals = {uuid: 0 for uuid in gpu_order}
    for app in apps:
        if app.pid in pids and app.gpu_uuid in totals:
            totals[app.gpu_uuid] += app.used_mib
    return [totals[uuid] for uuid in gpu_order]


# A device buffer line of llama.cpp's load log, e.g.
#   load_tensors:        CUDA0 model buffer size = 20038.81 MiB
#   llama_kv_cache: RPC0[127.0.0.1:50100] KV buffer size =    90.00 MiB
#   sched_reserve:        CUDA1 compute buffer size =   420.04 MiB
# (src/llama-model.cpp, src/llama-kv-cache.cpp, src/llama-context.cpp). Host buffers (CPU, CPU_Mapped,
# CUDA_Host) carry no digit after their name and are not devices.
BUFFER_LINE = re.compile(r"\b(?P<device>[A-Za-z]+\d+(?:\[[^\]]*\])?)\s+(?P<kind>model|KV|compute) buffer size\s*=\s*(?P<mib>[\d.]+) MiB")


@dataclass
class DeviceBuffers:
    device: str
    model_mib: float = 0.0
    kv_mib: float = 0.0
    compute_mib: float = 0.0


def parse_device_buffers(log: str) -> list[DeviceBuffers]:
    """Each accelerator device's model, KV and compute buffers from one start's load log, in device order.

    The --fit pre-pass of newer builds prints size-0 dry-run buffers first; the real ones come last.
    """
    devices: dict[str, DeviceBuffers] = {}
    for match in BUFFER_LINE.finditer(log):
        name, mib = match["device"], float(match["mib"])
        if name.upper().startswith("CPU") or mib <= 0:
            continue
        entry = devices.setdefault(name, DeviceBuffers(name))
        setattr(entry, {"model": "model_mib", "KV": "kv_mib", "compute": "compute_mib"}[match["kind"]], mib)
    return list(devices.values())


def split_problems(plan: HostPlan, buffers: list[DeviceBuffers], kv_per_layer_mib: float) -> list[str]:
    """Does llama-server hold the planned blocks on each device? Blocks are read from the KV buffers
    (every block keeps its KV on its own device: src/llama-kv-cache.cpp), which are exact."""
    want = plan.tensor_split or []
    names = ", ".join(b.device for b in buffers) or "no device"
    if len(buffers) != len(want):
        return [f"llama-server loaded onto {len(buffers)} device(s) ({names}); the plan splits across {len(want)}"]
    got = [round(b.kv_mib / kv_per_layer_mib) for b in buffers]
    problems = []
    if got != want:
        problems.append(
            f"llama-server holds blocks {got} on {names} (from its KV buffers), the plan's are {want} "
            f"(--tensor-split {','.join(map(str, plan.tensor_split_flag or []))})"
        )
    if not plan.rehearsal and plan.devices and not problems:
        for buffer, device in zip(buffers, plan.devices):
            if abs(buffer.kv_mib - device.kv_cache_mib) > 1:
                problems.append(f"{buffer.device} holds {buffer.kv_mib:,.0f} MiB of KV cache, the plan's {device.device} {device.kv_cache_mib:,}")
    return problems


# ---------------------------------------------------------------- API replies


@dataclass(frozen=True)
class ChatReply:
    content: str
    reasoning: str
    tokens_per_second: float | None


def _inline_think(content: str) -> tuple[str, str]:
    """Older servers leave R1's reasoning inline as <think>...</think>; split it off."""
    match = re.match(r"\s*<think>(.*?)</think>(.*)", content, re.S)
    return (match.group(2), match.group(1)) if match else (content, "")


def ollama_chat_reply(reply: dict[str, Any]) -> ChatReply:
    """A non-streamed /api/chat answer: message.content, message.thinking, eval_count/eval_duration (ns)."""
    message = reply.get("message") or {}
    content, inline = _inline_think(str(message.get("content") or ""))
    thinking = str(message.get("thinking") or "") or inline
    count, duration = reply.get("eval_count"), reply.get("eval_duration")
    tps = None
    if isinstance(count, (int, float)) and isinstance(duration, (int, float)) and duration > 0 and count > 0:
        tps = count / duration * 1e9
    return ChatReply(content.strip(), thinking.strip(), tps)


def openai_chat_reply(reply: dict[str, Any]) -> ChatReply:
    """A llama-server /v1/chat/completions answer: choices[0].message, timings.predicted_per_second."""
    choices = reply.get("choices") or [{}]
    message = choices[0].get("message") or {}
    content, inline = _inline_think(str(message.get("content") or ""))
    reasoning = str(message.get("reasoning_content") or "") or inline
    tps = (reply.get("timings") or {}).get("predicted_per_second")
    return ChatReply(content.strip(), reasoning.strip(), float(tps) if isinstance(tps, (int, float)) and tps > 0 else None)


def ollama_model_layer(manifest: dict[str, Any]) -> str | None:
    """The hex sha256 of a manifest's model layer (the GGUF blob), as the catalog pins it."""
    for layer in manifest.get("layers") or []:
        if layer.get("mediaType") == "application/vnd.ollama.image.model":
            return str(layer.get("digest", "")).removeprefix("sha256:") or None
    return None


def ollama_manifest_path(models_dir: str, tag: str) -> str:
    """Where Ollama stores a tag's manifest: <models>/manifests/<registry>/<namespace>/<model>/<tag>."""
    name, _, version = tag.partition(":")
    parts = name.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    return "/".join([models_dir.rstrip("/"), "manifests", *parts, version or "latest"])


def speed_problem(measured: float | None, estimate: float | None, min_fraction: float) -> str | None:
    """None when the decode rate is acceptable, else why not."""
    if measured is None or measured <= 0:
        return "no decode rate was measured (the reply carried no token timings)"
    if estimate and min_fraction > 0 and measured < min_fraction * estimate:
        return f"{measured:.1f} tokens/s is below {min_fraction:g} x the plan's estimate of {estimate:g} tokens/s"
    return None


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


def systemd_environment(text: str) -> dict[str, str]:
    """`systemctl show -p Environment --value UNIT` -> {name: value} (values may be quoted)."""
    import shlex

    env = {}
    try:
        words = shlex.split(text)
    except ValueError:
        words = text.split()
    for word in words:
        key, sep, value = word.partition("=")
        if sep:
            env[key] = value
    return env


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


# ---------------------------------------------------------------- the table


@dataclass
class HostResult:
    """What one host showed during a verify run (filled by the suite's report plugin)."""

    host: str
    model: str | None = None
    backend: str | None = None
    context: int | None = None
    rehearsal: bool = False
    target_model: str | None = None
    measured_tps: float | None = None
    est_tps: float | None = None
    gpu_used_mib: int | None = None
    gpu_planned_mib: int | None = None
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def result(self) -> str:
        return RESULT_FAIL if self.failed or self.error or not self.passed else RESULT_PASS


def planned_gpu_mib(plan: HostPlan) -> int | None:
    """Memory the plan puts on GPUs (or the unified pool); None for CPU-only plans."""
    if plan.placement in (None, "cpu"):
        return None
    return sum(d.planned_mib for d in plan.devices if not d.device.upper().startswith("RAM")) or None


def _num(value: float | int | None, fmt: str = "{:,.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _result_cell(r: HostResult) -> str:
    if r.result == RESULT_PASS:
        return RESULT_PASS
    named = list(r.failed) + ([r.error] if r.error and not r.failed else [])
    return f"{RESULT_FAIL}: {', '.join(named) or 'no check ran'}"


def results_table(results: list[HostResult]) -> str:
    """One line per host: model, backend, context, tokens/s and GPU memory measured vs planned, result."""
    header = ("HOST", "MODEL", "BACKEND", "CONTEXT", "TOK/S measured/est", "GPU MiB used/planned", "RESULT")
    rows = [header]
    for r in sorted(results, key=lambda r: r.host):
        model = r.model or "-"
        if r.rehearsal and r.target_model:
            model = f"{model} (rehearsal for {r.target_model})"
        rows.append((
            r.host,
            model,
            r.backend or "-",
            _num(r.context, "{}"),
            f"{_num(r.measured_tps, '{:.1f}')}/{_num(r.est_tps, '{:g}')}",
            f"{_num(r.gpu_used_mib)}/{_num(r.gpu_planned_mib)}",
            _result_cell(r),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    failed = [r for r in results if r.result != RESULT_PASS]
    lines.append("")
    lines.append(f"{len(results) - len(failed)}/{len(results)} hosts pass")
    for r in sorted(failed, key=lambda r: r.host):
        if r.error:
            lines.append(f"{r.host}: {r.error}")
    return "\n".join(lines)
