"""The fleet lock file (`<fleet file>.lock`): its schema, and reading and writing it (r1fleet/lock/match.py builds
and compares the entries).

YAML meant for git: `version: 1`, then `hosts:` with one host per key (sorted), each entry's fields in
the fixed order below, so equal locks are equal bytes and a relock shows as a small diff. It never holds
a secret: an API key appears only as its fingerprint (a sha256 prefix, r1fleet.lock.match.key_fingerprint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from r1fleet.plan.catalog import load_catalog
from r1fleet.errors import R1FleetError
from r1fleet.fleet import plugins
from r1fleet.lock.artifacts import Artifacts
from r1fleet.records import HostPlan, PoolPlan
from r1fleet.fleet.file import _UniqueKeyLoader

LOCK_VERSION = 1
RAM_STEP_MIB = 1024  # why: r1fleet/lock/match.py, where RAM is rounded and compared
KEY_FINGERPRINT_HEX = 16  # 64 bits: enough to tell keys apart, nothing to recover a key from


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GpuFingerprint(_Strict):
    index: int
    name: str
    uuid: str | None = None
    memory_mib: int
    measured: bool = Field(True, description="false: no driver yet, so the memory is the GPU table's, not the card's")


class Fingerprint(_Strict):
    """What identifies a host's hardware. Free memory and other programs' GPU use are left out: they
    change minute to minute and say nothing about which machine this is; so is the kernel release."""

    system: str
    distro: str = ""
    distro_version: str = ""
    arch: str = ""
    ram_mib: int = Field(description=f"MemTotal rounded to the nearest {RAM_STEP_MIB} MiB")
    gpus: list[GpuFingerprint] = []
    unified: str | None = Field(None, description="unified memory device: kind and name")


class HostLock(_Strict):
    fingerprint: Fingerprint
    plan: HostPlan
    artifacts: Artifacts = Artifacts()
    api_key_fingerprint: str | None = Field(None, pattern=rf"^sha256:[0-9a-f]{{{KEY_FINGERPRINT_HEX}}}$")

    @field_validator("plan", mode="before")
    @classmethod
    def _drop_computed(cls, value: Any) -> Any:
        # tensor_split_flag is computed from tensor_split; HostPlan refuses it as an input.
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k != "tensor_split_flag"}
        return value

    def document(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"plan": {"tensor_split_flag"}})


class Lock(_Strict):
    version: int = LOCK_VERSION
    hosts: dict[str, HostLock] = {}
    pools: dict[str, PoolPlan] = Field({}, description="each pool's plan, locked with its members' entries")

    @field_validator("pools", mode="before")
    @classmethod
    def _drop_pool_computed(cls, value: Any) -> Any:
        if isinstance(value, dict):  # tensor_split_flag is computed from tensor_split (as in HostLock)
            value = {name: ({k: v for k, v in plan.items() if k != "tensor_split_flag"} if isinstance(plan, dict) else plan)
                     for name, plan in value.items()}
        return value


# ---------------------------------------------------------------- reading and writing

HEADER = ("# r1fleet fleet lock: the hardware, plan and artifacts each host was locked with. Commit it.\n"
          "# Written by `r1fleet lock`; change it by relocking (`r1fleet lock HOST`), not by hand.\n")


def lock_path(fleet_source: str | Path) -> Path:
    """`<fleet file>.lock` beside the fleet file, unless a plug-in keeps its fleet's lock elsewhere (the lab's
    fleet file ships inside the package)."""
    path = Path(fleet_source)
    plugin = plugins.owning(path)
    return (plugin and plugin.lock_path(path)) or path.with_name(path.name + ".lock")


def lock_text(lock: Lock) -> str:
    """The file's text: hosts sorted by name, fields in model order, so equal locks are equal bytes."""
    import yaml

    document = {"version": lock.version, "hosts": {name: lock.hosts[name].document() for name in sorted(lock.hosts)}}
    if lock.pools:
        document["pools"] = {name: lock.pools[name].model_dump(mode="json", exclude={"tensor_split_flag"})
                             for name in sorted(lock.pools)}
    return HEADER + yaml.safe_dump(document, sort_keys=False, default_flow_style=False, allow_unicode=True, width=100)


def write_lock(path: str | Path, lock: Lock) -> None:
    """Write the lock atomically (a crash leaves the old file, never half a lock)."""
    import os
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(lock_text(lock))
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a lock holds no secret and is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_lock(path: str | Path) -> Lock | None:
    """The lock at `path`, None when there is none; R1FleetError naming the file, host and field when malformed."""
    import yaml
    from pydantic import ValidationError

    path = Path(path)
    fix = "restore it from git, or delete it and run `r1fleet lock` again"
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise R1FleetError(f"{path}: cannot be read: {err}", fix="give the lock file's path") from None
    except (yaml.YAMLError, RecursionError) as err:
        raise R1FleetError(f"{path}: not valid YAML: {err}", fix=fix) from None
    if not isinstance(raw, dict) or "hosts" not in raw:
        raise R1FleetError(f"{path}: not a fleet lock (expected `version: 1` and `hosts:`)", fix=fix)
    if raw.get("version") != LOCK_VERSION:
        raise R1FleetError(f"{path}: field version: lock format {raw.get('version')!r}; this r1fleet reads "
                           f"version {LOCK_VERSION}", fix="use the r1fleet that wrote it, or relock with `r1fleet lock`")
    try:
        lock = Lock.model_validate(raw)
    except ValidationError as err:
        raise _explain(path, err, fix) from None
    _check_hosts(path, lock, fix)
    return lock


def _explain(path: Path, err: Any, fix: str) -> R1FleetError:
    lines, first = [], None
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        host = loc[1] if len(loc) >= 2 and loc[0] == "hosts" else None
        field = ".".join(loc[2:] if host else loc) or "(file)"
        first = first or (host, field)
        lines.append(f"{path}: " + (f"host {host}: " if host else "") + f"field {field}: {item['msg']}")
    error = R1FleetError("\n".join(lines), fix=fix)
    error.host, error.field = first or (None, None)
    return error


def _check_hosts(path: Path, lock: Lock, fix: str) -> None:
    """What the schema cannot say: each entry is its own host's, and its model is one this r1fleet knows."""
    known = set(load_catalog().ids)
    for name, entry in lock.hosts.items():
        problem = None
        if entry.plan.host != name:
            problem = ("plan.host", f"is {entry.plan.host!r}, under host {name!r}")
        elif entry.plan.model is not None and entry.plan.model not in known:
            problem = ("plan.model", f"{entry.plan.model!r} is not in this r1fleet's catalog")
        if problem:
            error = R1FleetError(f"{path}: host {name}: field {problem[0]}: {problem[1]}", fix=fix)
            error.host, error.field = name, problem[0]
            raise error
