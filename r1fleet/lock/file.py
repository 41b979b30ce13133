"""The fleet lock file (`<fleet file>.lock`): its schema, and reading and writing it (r1fleet/lock/match.py builds
and compares the entries).

YAML meant for git: `version: 1`, then `hosts:` with one host per key (sorted), each entry's fields in
the fixed order below, so equal locks are equal bytes and a relock shows as a small diff. It never holds
a secret: an API key appears only as its fingerprint (a sha256 prefix, r1fleet.lock.match.key_fingerprint).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from r1fleet.plan.catalog import load_catalog
from r1fleet.errors import R1FleetError
from r1fleet.fleet import plugins
from r1fleet.lock.artifacts import Artifacts
from r1fleet.records import HostPlan, PoolPlan
from r1fleet.fleet.file import HOST_NAME_PATTERN, _UniqueKeyLoader

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
    """What the schema cannot say, because a lock is a file people commit, review and copy, and so is read as
    untrusted: each entry is its own host's and names it by the fleet's grammar; each pool too; a model is one
    this r1fleet knows, with exactly the tag and the GGUF (name, URL, size, sha256) its catalog pins; a plan
    names only GPUs of its own fingerprint. The deploy serves what the lock says, so nothing in it may choose
    a path, a URL or a unit line."""
    for name, entry in lock.hosts.items():
        uuids = {gpu.uuid for gpu in entry.fingerprint.gpus if gpu.uuid}
        problem = (_name_problem(name)
                   or (("plan.host", f"is {entry.plan.host!r}, under host {name!r}") if entry.plan.host != name else None)
                   or _model_problem(entry.plan, "plan")
                   or (("plan.context_length", f"{entry.plan.context_length} is no context a fitting plan runs at")
                       if entry.plan.fits and entry.plan.context_length < 1 else None)
                   or next((("plan.gpu_uuids", f"{uuid!r} is not a GPU of this host's fingerprint")
                            for uuid in entry.plan.gpu_uuids if uuid not in uuids), None))
        if problem:
            raise _located(path, f"host {_shown(name)}", name, problem, fix)
    for name, pool in lock.pools.items():
        problem = (_name_problem(name)
                   or (("pool", f"is {pool.pool!r}, under pool {name!r}") if pool.pool != name else None)
                   or next((("head/workers", f"{member!r} is not a host name") for member in [pool.head, *pool.workers]
                            if _name_problem(member)), None)
                   or (("workers", f"the head {pool.head!r} is among them") if pool.head in pool.workers else None)
                   or _model_problem(pool, "")
                   or (_numbers_problem(pool) if pool.pooled else None))
        if problem:
            raise _located(path, f"pool {_shown(name)}", None, problem, fix)


def _numbers_problem(pool: PoolPlan) -> tuple[str, str] | None:
    """What a pooled pool's plan says that no plan could (the deploy writes these into units and rules)."""
    if not 1 <= pool.rpc_port <= 65535:
        return "rpc_port", f"{pool.rpc_port} is not a TCP port"
    if not pool.network_gbps > 0:
        return "network_gbps", f"{pool.network_gbps} is no network speed"
    if pool.context_length < 1:
        return "context_length", f"{pool.context_length} is no context a pool runs at"
    return None


def _shown(name: str) -> str:
    """A name as an error shows it: quoted when it is not a fleet name (a newline in it ends no line)."""
    return name if _name_problem(name) is None else repr(name)


def _name_problem(name: str) -> tuple[str, str] | None:
    if re.fullmatch(HOST_NAME_PATTERN, name):
        return None
    return "(name)", f"{name!r} is not a name a fleet file allows (letters, digits, '.', '_', '-')"


def _model_problem(plan: HostPlan | PoolPlan, prefix: str) -> tuple[str, str] | None:
    """A plan's model, tag and GGUF against the catalog's pin (None when they are exactly the pin)."""
    field = (lambda name: f"{prefix}.{name}" if prefix else name)
    if plan.model is None:
        return (field("gguf"), "is given for a plan without a model") if plan.gguf is not None else None
    try:
        model = load_catalog().find(plan.model)
    except KeyError:
        return field("model"), f"{plan.model!r} is not in this r1fleet's catalog"
    if model.id != plan.model:
        return field("model"), f"{plan.model!r} is not a catalog id (the catalog calls it {model.id!r})"
    if plan.ollama_tag is not None and plan.ollama_tag != model.ollama_tag:
        return field("ollama_tag"), f"{plan.ollama_tag!r} is not the tag the catalog pins for {model.id} ({model.ollama_tag})"
    if plan.gguf is not None and plan.gguf != model.pinned_gguf():
        return field("gguf"), f"is not the GGUF the catalog pins for {model.id} (file {model.gguf.file}, its URL and sha256)"
    return None


def _located(path: Path, where: str, host: str | None, problem: tuple[str, str], fix: str) -> R1FleetError:
    error = R1FleetError(f"{path}: {where}: field {problem[0]}: {problem[1]}", fix=fix)
    error.host, error.field = host, problem[0]
    return error
