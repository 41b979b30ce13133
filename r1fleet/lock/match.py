"""The fleet lock (`<fleet file>.lock`): per host, the hardware it was planned on, the plan, and every
artifact by digest, so a rebuilt host gets exactly what it had (issue 13).

Pure, apart from read_lock/write_lock (the file's schema and I/O are in r1fleet/lock/file.py, re-exported
here). The file never holds a secret: an API key appears only as `key_fingerprint(text)`, a sha256 prefix.

Example:
    >>> entry = lock_entry("box", hw, plan_host(hw, policy))
    >>> locked_plan(entry, parse_probe(text, "box"), fleet="fleet.yml")  # LockMismatch if the hardware changed
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

from r1fleet.fleet.config import HostConfig
from r1fleet.errors import R1FleetError
from r1fleet.fleet import plugins
from r1fleet.artifacts.pins import Pins
from r1fleet.lock.artifacts import artifacts_for
from r1fleet.lock.file import (
    KEY_FINGERPRINT_HEX,
    LOCK_VERSION,
    RAM_STEP_MIB,
    Fingerprint,
    GpuFingerprint,
    HostLock,
    Lock,
    lock_path,
    lock_text,
    read_lock,
    write_lock,
)
from r1fleet.records import Hardware, HostPlan, PoolPlan
from r1fleet.plan.policy import Policy
from r1fleet.plan.planner import plan_host

__all__ = [
    "LOCK_VERSION", "Fingerprint", "GpuFingerprint", "HostLock", "Lock", "LockMismatch", "effective_plan",
    "fingerprint_differences", "fingerprint_of", "key_fingerprint", "lock_entry", "lock_path", "lock_text",
    "locked_plan", "locked_pool", "plan_diff", "pool_diff", "read_lock", "relock_command", "relock_fleet", "write_lock",
]


class LockMismatch(R1FleetError):
    """A locked host whose hardware is no longer what it was locked on."""

    def __init__(self, host: str, differences: list[str], fleet: str | None = None):
        self.differences = differences
        super().__init__(
            "the hardware differs from the lock: " + "; ".join(differences), host=host,
            fix=f"if the change is meant, relock this host with `{relock_command(host, fleet)}` and commit the lock",
        )


def relock_fleet(source: str) -> str:
    """The fleet as a user names it on the command line: a plug-in's name (`lab`) for its fleet file."""
    plugin = plugins.owning(source)
    return plugin.name if plugin else source


def fleet_lock(fleet: str | None) -> tuple[Lock | None, str | None]:
    """The lock of the fleet file `fleet` (None without a fleet, or when it has no lock) and the fleet as a relock
    command names it: what a deploy of that fleet serves by."""
    if not fleet:
        return None, None
    return read_lock(lock_path(fleet)), relock_fleet(fleet)


def relock_command(host: str, fleet: str | None = None) -> str:
    return f"r1fleet lock --fleet {fleet} {host}" if fleet else f"r1fleet lock {host}"


# ---------------------------------------------------------------- building entries


def key_fingerprint(text: str | bytes) -> str:
    """`sha256:` and the first 16 hex digits of the key file's exact bytes (`sha256sum FILE | cut -c1-16`)."""
    data = text.encode() if isinstance(text, str) else text
    return "sha256:" + hashlib.sha256(data).hexdigest()[:KEY_FINGERPRINT_HEX]


def round_ram(mib: int) -> int:
    """MemTotal to the nearest GiB; fingerprint_differences also lets a reading within one GiB match.

    MemTotal is "physical RAM minus a few reserved bits and the kernel binary code" (proc_meminfo(5),
    Linux Documentation/filesystems/proc.rst), so it moves by a few MiB with a kernel or firmware update:
    rounding keeps a relock from rewriting the line, the tolerance covers a reading that crosses a
    half-GiB boundary. A DIMM added or removed (4 GiB or more) still differs."""
    return int((mib + RAM_STEP_MIB // 2) // RAM_STEP_MIB * RAM_STEP_MIB)


def fingerprint_of(hw: Hardware) -> Fingerprint:
    gpus = [GpuFingerprint(index=g.index, name=g.name, uuid=g.uuid, memory_mib=g.memory_total_mib,
                           measured=g.source != "lspci") for g in hw.gpus]
    unified = f"{hw.unified.kind}: {hw.unified.name}" if hw.unified else None
    return Fingerprint(system=hw.os.system, distro=hw.os.id, distro_version=hw.os.version_id, arch=hw.os.arch,
                       ram_mib=round_ram(hw.ram_total_mib), gpus=gpus, unified=unified)


def lock_entry(host: str, hw: Hardware, plan: HostPlan, settings: HostConfig | None = None,
               api_key_text: str | bytes | None = None, pins: Pins | None = None) -> HostLock:
    """One host's lock: its fingerprint, the plan as given, the artifacts it needs, and the key's fingerprint."""
    settings = settings or HostConfig(name=host, address="localhost")
    return HostLock(
        fingerprint=fingerprint_of(hw),
        plan=plan,
        artifacts=artifacts_for(hw, plan, settings, pins),
        api_key_fingerprint=key_fingerprint(api_key_text) if api_key_text is not None else None,
    )


# ---------------------------------------------------------------- comparing


def _gpu_label(gpu: GpuFingerprint | None, with_uuid: bool = False) -> str:
    if gpu is None:
        return "absent"
    label = f"{gpu.name} {gpu.memory_mib} MiB"
    return f"{label} ({gpu.uuid})" if with_uuid and gpu.uuid else label


def _same_name(a: str, b: str) -> bool:
    # Older drivers and rocm-smi drop the vendor word ("GeForce GTX 1080 Ti"); data/gpus.yaml matches likewise.
    def bare(name: str) -> str:
        return name.lower().removeprefix("nvidia ").removeprefix("amd ").strip()

    return bare(a) == bare(b)


def _gpu_difference(index: int, old: GpuFingerprint | None, new: GpuFingerprint | None) -> str | None:
    if old is None or new is None:
        return f"GPU {index}: {_gpu_label(old)} -> {_gpu_label(new)}"
    # A GPU seen before its driver has no UUID, and its memory is the GPU table's: compare what both know.
    uuid_changed = bool(old.uuid and new.uuid and old.uuid != new.uuid)
    memory_changed = old.measured and new.measured and old.memory_mib != new.memory_mib
    if _same_name(old.name, new.name) and not uuid_changed and not memory_changed:
        return None
    return f"GPU {index}: {_gpu_label(old, uuid_changed)} -> {_gpu_label(new, uuid_changed)}"


def fingerprint_differences(locked: Fingerprint, live: Fingerprint) -> list[str]:
    """What changed, one line each, e.g. `GPU 1: NVIDIA GeForce RTX 3090 24576 MiB -> absent`; [] = a match."""
    out = []
    for label, old, new in (("OS", locked.system, live.system), ("architecture", locked.arch, live.arch),
                            ("distribution", f"{locked.distro} {locked.distro_version}".strip(),
                             f"{live.distro} {live.distro_version}".strip()),
                            ("unified memory", locked.unified or "none", live.unified or "none")):
        if old != new:
            out.append(f"{label}: {old or '?'} -> {new or '?'}")
    if abs(locked.ram_mib - live.ram_mib) > RAM_STEP_MIB:
        out.append(f"RAM: {locked.ram_mib} MiB -> {live.ram_mib} MiB")
    old_gpus = {g.index: g for g in locked.gpus}
    new_gpus = {g.index: g for g in live.gpus}
    for index in sorted(old_gpus.keys() | new_gpus.keys()):
        line = _gpu_difference(index, old_gpus.get(index), new_gpus.get(index))
        if line:
            out.append(line)
    return out


def locked_plan(host_lock: HostLock, hw: Hardware, fleet: str | None = None) -> HostPlan:
    """The locked plan, exactly, when `hw` is the hardware it was locked on; LockMismatch otherwise.

    One thing comes from the live host: GPU UUIDs the lock could not know (locked before the NVIDIA
    driver, when lspci shows no UUID), so the deploy can still pin CUDA_VISIBLE_DEVICES to those cards."""
    plan = host_lock.plan
    differences = fingerprint_differences(host_lock.fingerprint, fingerprint_of(hw))
    if differences:
        raise LockMismatch(plan.host, differences, fleet)
    live = {g.index: g.uuid for g in hw.gpus}
    uuids = [live.get(i) for i in plan.gpu_indices]
    if not plan.gpu_uuids and plan.vendor == "nvidia" and uuids and all(uuids):
        return plan.model_copy(update={"gpu_uuids": uuids})
    return plan


def locked_pool(lock: Lock | None, name: str, hardware: Mapping[str, Hardware], fleet: str | None = None):
    """The locked plan of pool `name` (a PoolPlan) when the lock holds it and every member's hardware is what it
    was locked on; None when the lock has no such pool (it is planned live). LockMismatch names a member whose
    hardware changed, with the command that relocks it (and so its pool)."""
    if lock is None or name not in lock.pools:
        return None
    for member, hw in hardware.items():
        entry = lock.hosts.get(member)
        if entry is None:
            return None
        differences = fingerprint_differences(entry.fingerprint, fingerprint_of(hw))
        if differences:
            raise LockMismatch(member, differences, fleet)
    return lock.pools[name]


def effective_plan(hw: Hardware, policy: Policy, lock: Lock | None, fleet: str | None = None) -> HostPlan:
    """What the deploy serves on a host: its locked plan when the lock has it, else today's plan (no lock: as before)."""
    if lock is not None and hw.host in lock.hosts:
        return locked_plan(lock.hosts[hw.host], hw, fleet)
    return plan_host(hw, policy)


# What a relock may change, as a person names it.
_PLAN_FIELDS = (("model", "model"), ("backend", "backend"), ("placement", "placement"),
                ("context_length", "context"), ("kv_cache_type", "KV cache"), ("flash_attention", "flash attention"),
                ("ubatch", "micro-batch"), ("tensor_split", "split (blocks per GPU)"), ("gpu_indices", "GPUs"),
                ("gpu_uuids", "GPU UUIDs"), ("cache_ram_mib", "prompt cache (--cache-ram, MiB)"))


def plan_diff(locked: HostPlan, fresh: HostPlan) -> list[str]:
    """What relocking would change (`context: 14336 -> 16384`), then today's reasons; [] = no change."""
    changes = []
    for attr, label in _PLAN_FIELDS:
        old, new = getattr(locked, attr), getattr(fresh, attr)
        if old != new:
            changes.append(f"{label}: {_show(old)} -> {_show(new)}")
    if not changes:
        return []
    return [*changes, *(f"why: {reason}" for reason in fresh.reasons)]


# What a relock of a pool may change.
_POOL_FIELDS = (("pooled", "pooled"), ("head", "head"), ("workers", "workers"), ("model", "model"),
                ("context_length", "context"), ("kv_cache_type", "KV cache"), ("flash_attention", "flash attention"),
                ("tensor_split", "split (blocks per device)"))


def pool_diff(locked: PoolPlan, fresh: PoolPlan) -> list[str]:
    """What relocking a pool would change (`model: a -> b`), one line each; [] = no change."""
    return [f"{label}: {_show(getattr(locked, attr))} -> {_show(getattr(fresh, attr))}"
            for attr, label in _POOL_FIELDS if getattr(locked, attr) != getattr(fresh, attr)]


def _show(value: Any) -> str:
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return "|".join(str(v) for v in value)
    return str(value)
