"""The pure side of `r1fleet verify`: judge what a host shows against its plan (GPUs, split, replies, speed).

Nothing here touches a host. The testinfra suite (r1fleet/verify/suite/) runs commands over SSH and hands
their raw output to these functions, so every judgement (which listener is too open, which GPU is
missing, whether a split or a speed is off) is unit tested with real output formats.

Sockets and service managers are read in r1fleet/verify/readings.py; the table is r1fleet/verify/table.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from r1fleet.hardware import parse_nvidia_apps
from r1fleet.records import DevicePlan, HostPlan
from r1fleet.verify.readings import DeviceMemory, MemoryBreakdown

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


# ---------------------------------------------------------------- llama.cpp's own account against the plan


@dataclass(frozen=True)
class DeviceAccount:
    """One planned device beside llama.cpp's account of it at this start (parse_memory_breakdown)."""

    planned: DevicePlan
    llama: DeviceMemory

    @property
    def allowed_mib(self) -> int:
        """What the plan lets llama.cpp's own buffers hold there: its weights, KV cache and compute, and the headroom
        kept for the estimate's error. The overhead stays out: it stands for what llama.cpp does not count (the
        runtime's context, cuBLAS, pools: its `unaccounted` column)."""
        d = self.planned
        return d.weights_mib + d.kv_cache_mib + d.compute_mib + d.headroom_mib

    @property
    def over(self) -> bool:
        return self.llama.self_mib > self.allowed_mib

    @property
    def where(self) -> str:
        return f"{self.llama.name} ({self.llama.description})" if self.llama.description else self.llama.name

    def summary(self) -> str:
        return f"{self.where} {self.llama.self_mib:,}/{self.allowed_mib:,} MiB"


def device_accounts(plan: HostPlan, breakdown: MemoryBreakdown) -> tuple[list[DeviceAccount], list[str]]:
    """Each planned device with llama.cpp's row for it, and why some could not be paired. A CPU plan's one device is
    llama.cpp's host row; a pool head plans only its own GPUs, the last of llama.cpp's devices (the workers' RPC
    devices come first, src/llama.cpp); a host alone plans every device llama.cpp lists, in its order."""
    if plan.placement == "cpu":
        if breakdown.host is None or not plan.devices:
            return [], ["llama-server's memory breakdown has no host row for the plan's RAM"]
        return [DeviceAccount(plan.devices[0], breakdown.host)], []
    rows, planned = list(breakdown.devices), list(plan.devices)
    head = bool(plan.tensor_split) and len(plan.tensor_split or []) > len(planned)
    if len(rows) != len(planned) and not (head and len(rows) >= len(planned)):
        names = ", ".join(r.name for r in rows) or "no device"
        return [], [f"llama-server accounts for {len(rows)} device(s) ({names}), the plan for {len(planned)}"]
    return [DeviceAccount(d, r) for d, r in zip(planned, rows[len(rows) - len(planned):])], []


def memory_problems(plan: HostPlan, breakdown: MemoryBreakdown) -> list[str]:
    """A device where llama.cpp's own account at this start is over what the plan gives it (weights, KV, compute and
    headroom), and what could not be read or paired."""
    accounts, problems = device_accounts(plan, breakdown)
    problems = [*breakdown.problems, *problems]
    for account in accounts:
        if not account.over:
            continue
        d, m = account.planned, account.llama
        problems.append(
            f"{account.where} holds {m.self_mib:,} MiB by llama.cpp's own account (model "
            f"{m.model_mib:,} + context {m.context_mib:,} + compute {m.compute_mib:,}), over the {account.allowed_mib:,} "
            f"the plan gives {d.device} (weights {d.weights_mib:,} + KV {d.kv_cache_mib:,} + compute {d.compute_mib:,} "
            f"+ headroom {d.headroom_mib:,}), which leaves less than the {d.overhead_mib:,} planned for the runtime: "
            "it may run out of memory under load (fix: plan a smaller context or a larger headroom_mib, then redeploy)"
        )
    return problems


def memory_summary(plan: HostPlan, breakdown: MemoryBreakdown) -> str:
    """llama.cpp's account at this start against the plan, one line: `RPC0 (127.0.0.1:50100) 180/23,360 MiB, ...`."""
    accounts, _ = device_accounts(plan, breakdown)
    paired = {id(a.llama) for a in accounts}
    parts = [a.summary() for a in accounts]
    parts += [f"{r.name} {r.self_mib:,} MiB (not planned here)" for r in breakdown.devices if id(r) not in paired]
    if breakdown.host is not None and plan.placement != "cpu":
        parts.append(f"host {breakdown.host.self_mib:,} MiB")
    return ", ".join(parts) or "no device"


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


def ollama_chat_body(tag: str, messages: list[dict[str, str]], budget: int, reasoning: bool,
                     capabilities: Any) -> dict[str, Any]:
    """verify's /api/chat request. `think: true` only where the model reports the `thinking` capability (its
    /api/show): Ollama answers it with HTTP 400 for a model whose template cannot think (server/routes.go:
    2592-2607 of v0.32.9), and such a model's R1 still writes its reasoning, inline as <think>...</think>."""
    body = {"model": tag, "messages": messages, "stream": False, "keep_alive": -1,
            "options": {"num_predict": budget, "temperature": 0}}
    if reasoning and isinstance(capabilities, list) and "thinking" in capabilities:
        body["think"] = True
    return body


def openai_chat_reply(reply: dict[str, Any]) -> ChatReply:
    """A /v1/chat/completions answer: choices[0].message, timings.predicted_per_second. The reasoning is
    `reasoning_content` from llama-server and `reasoning` from Ollama's /v1 (openai/openai.go), else inline."""
    choices = reply.get("choices") or [{}]
    message = choices[0].get("message") or {}
    content, inline = _inline_think(str(message.get("content") or ""))
    reasoning = str(message.get("reasoning_content") or message.get("reasoning") or "") or inline
    tps = (reply.get("timings") or {}).get("predicted_per_second")
    return ChatReply(content.strip(), reasoning.strip(), float(tps) if isinstance(tps, (int, float)) and tps > 0 else None)


def speed_problem(measured: float | None, estimate: float | None, min_fraction: float) -> str | None:
    """None when the decode rate is acceptable, else why not."""
    if measured is None or measured <= 0:
        return "no decode rate was measured (the reply carried no token timings)"
    if estimate and min_fraction > 0 and measured < min_fraction * estimate:
        return f"{measured:.1f} tokens/s is below {min_fraction:g} x the plan's estimate of {estimate:g} tokens/s"
    return None


