"""`r1fleet cache status|prune|fill`: show, trim and fill the controller's artifact cache (r1fleet/cache/store.py).

    r1fleet cache status [--fleet F] [--json]
    r1fleet cache prune [--fleet F] --all | --older-than DAYS | --unused-by-lock [--older-than DAYS]
    r1fleet cache fill [--fleet F]          # every artifact the fleet's lock names, fetched once

The cache is $R1FLEET_CACHE_DIR, else the fleet file's `cache: {dir: ...}`, else
$XDG_CACHE_HOME/r1fleet/artifacts (~/.cache/r1fleet/artifacts). `fill` downloads only from URLs the repository
pins for that exact sha256 (versions.yaml, catalog.yaml, plan/drivers.yaml, a host's ollama_release); any
other artifact is reported with the reason, never looked for elsewhere.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from r1fleet.errors import R1FleetError
from r1fleet.progress import human_bytes
from r1fleet.artifacts.pins import Pins, load_pins
from r1fleet.cache.registry import ModelName, blob_name, cached_manifest, ollama_blobs
from r1fleet.cache.store import ArtifactCache, cache_root
from r1fleet.fleet.file import FLEET_HELP, REPO_ROOT, load_fleet, resolve_ref
from r1fleet.lock.match import lock_path, read_lock
from r1fleet.plan.catalog import load_catalog
from r1fleet.progress import TerminalProgress
from r1fleet.roles.ollama.decide import registry_of, takes_from_registry, weights_digest
from r1fleet.lock.served import rehearsed

def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("cache", help="the controller's artifact cache: status, prune, fill",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cache_command", required=True)
    status = sub.add_parser("status", help="entries, sizes and when each was last used")
    status.add_argument("--fleet", help=FLEET_HELP + "; read for its cache.dir when present")
    status.add_argument("--json", action="store_true", help='print {"dir", "entries", "total_bytes"}')
    status.set_defaults(run=cmd_status)
    prune = sub.add_parser("prune", help="delete entries: all, those unused for DAYS, or those the lock does not name")
    prune.add_argument("--fleet", help=FLEET_HELP)
    prune.add_argument("--all", action="store_true", help="empty the cache")
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="entries not used for DAYS days")
    prune.add_argument("--unused-by-lock", action="store_true", help="entries no host of the fleet's lock names")
    prune.set_defaults(run=cmd_prune)
    fill = sub.add_parser("fill", help="fetch every artifact the fleet's lock names, once, with progress")
    fill.add_argument("--fleet", help=FLEET_HELP)
    fill.set_defaults(run=cmd_fill)
    return p


def _fleet(ref: str | None, required: bool):
    """The fleet given, or the default one; None when none was given and the default does not exist."""
    default = resolve_ref(ref)
    exists = default == "lab" or Path(default).exists() or (REPO_ROOT / default).exists()
    if not required and ref is None and not exists:
        return None
    return load_fleet(ref, lab_state=False)  # the lab's file is read, no lab host is reached


def _cache(fleet) -> ArtifactCache:
    root = cache_root(fleet.cache_dir if fleet else None)
    if root.exists() and not root.is_dir():
        raise R1FleetError(f"{root}: not a directory", field="cache.dir",
                           fix="point cache.dir or $R1FLEET_CACHE_DIR at a directory")
    return ArtifactCache(root)


def _lock(fleet):
    path = lock_path(fleet.source)
    lock = read_lock(path)
    if lock is None:
        raise R1FleetError(f"{path}: no lock, so no artifact is pinned",
                           fix=f"write one with `r1fleet lock --fleet {fleet.source}`")
    return lock


# ---------------------------------------------------------------- status and prune


def cmd_status(args: argparse.Namespace) -> int:
    cache = _cache(_fleet(args.fleet, required=False))
    entries = cache.status()
    total = sum(e.size for e in entries)
    if args.json:
        rows = [{"name": e.name, "sha256": e.sha256, "size": e.size, "complete": e.complete,
                 "last_used": e.last_used.isoformat(), "fetched_at": e.fetched_at and e.fetched_at.isoformat()}
                for e in entries]
        print(json.dumps({"dir": str(cache.root), "entries": rows, "total_bytes": total}, indent=2))
        return 0
    print(status_table(entries) if entries else "(empty)")
    print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {human_bytes(total)} in {cache.root}")
    return 0


def status_table(entries: list) -> str:
    rows = [("NAME", "SHA256", "SIZE", "LAST USED")]
    rows += [(e.name + ("" if e.complete else " (partial)"), e.sha256[:12], human_bytes(e.size),
              e.last_used.astimezone().strftime("%Y-%m-%d %H:%M")) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_prune(args: argparse.Namespace) -> int:
    if args.all and (args.older_than is not None or args.unused_by_lock):
        raise R1FleetError("--all deletes every entry; it takes no other choice", field="--all",
                           fix="give --all alone, or --older-than DAYS and/or --unused-by-lock")
    if not (args.all or args.older_than is not None or args.unused_by_lock):
        raise R1FleetError("say what to prune", fix="give --all, --older-than DAYS or --unused-by-lock")
    if args.older_than is not None and args.older_than < 0:
        raise R1FleetError(f"{args.older_than:g} is not a number of days", field="--older-than", fix="give 0 or more")
    fleet = _fleet(args.fleet, required=args.unused_by_lock)
    cache = _cache(fleet)
    keep = locked_digests(_lock(fleet), cache) if args.unused_by_lock else None
    before = len(cache.status())
    freed = cache.prune(keep=keep, older_than_days=args.older_than)
    removed = before - len(cache.status())
    print(f"freed {human_bytes(freed)} ({removed} entr{'y' if removed == 1 else 'ies'}) in {cache.root}")
    return 0


def locked_digests(lock, cache: ArtifactCache | None = None) -> set[str]:
    """Every sha256 a lock names, whatever the host needs it for, and the blobs each locked Ollama manifest
    in `cache` names."""
    digests = set()
    for entry in lock.hosts.values():
        a = entry.artifacts
        digests.update(asset.sha256 for asset in (a.ollama.assets if a.ollama else []))
        if a.model:
            manifest = a.model.ollama_manifest.sha256 if a.model.ollama_manifest else None
            digests.update((a.model.gguf_sha256, a.model.ollama_digest, manifest))
            kept = cache.path_for(manifest, touch=False) if cache and manifest else None
            digests.update(ollama_blobs(kept.read_bytes()) if kept else ())
        if a.llama_cpp:
            digests.add(a.llama_cpp.source_sha256)
    return {d.lower() for d in digests if d}


# ---------------------------------------------------------------- fill


@dataclass
class Wanted:
    """One artifact the lock needs: where to fetch it, or why it is not fetched."""

    name: str
    sha256: str | None
    hosts: list[str] = field(default_factory=list)
    url: str | None = None
    size: int | None = None
    unknown: str | None = None


def known_sources(fleet=None, pins: Pins | None = None) -> dict[str, tuple[str | None, int | None, str]]:
    """sha256 -> (URL or None, size, why there is no URL): only what the repository and the fleet pin."""
    pins = pins or load_pins()
    ollama, llama = pins.ollama, pins.llama_cpp
    base = ollama.release_url()
    sources: dict[str, tuple[str | None, int | None, str]] = {}
    for name, sha in ollama.sha256.items():
        if sha:
            sources[sha.lower()] = (f"{base}/{name}", None, "")
    if darwin := ollama.darwin_release():
        sources[darwin.sha256] = (darwin.url, None, "")
    for host in (fleet.hosts.values() if fleet else []):
        release = host.ollama_release
        if release and release.base_url:
            own = release.base_url.format(version=release.version or ollama.version).rstrip("/")
            sources.update({sha.lower(): (f"{own}/{name}", None, "") for name, sha in release.sha256.items() if sha})
    sources[llama.source_sha256.lower()] = (llama.source, None, "")
    catalog = load_catalog()
    for model in [*catalog.models, *catalog.stand_ins]:
        gguf = model.gguf
        if gguf.sha256:
            why = "" if gguf.url else "catalog.yaml gives no download URL (a rehearsal stand-in: a mirror serves it)"
            sources[gguf.sha256] = (gguf.url, gguf.size_bytes, why)
    return sources


def _host_needs(entry) -> list[tuple[str, str | None, str | None]]:
    """(name, sha256, why not fetched) for what one locked host downloads."""
    a, plan = entry.artifacts, entry.plan
    needs: list[tuple[str, str | None, str | None]] = [
        (asset.name, asset.sha256, None if asset.sha256 else "no sha256 is pinned for it (the deploy refuses it too)")
        for asset in (a.ollama.assets if a.ollama else [])]
    if a.model and (plan.backend == "llama.cpp" or plan.rehearsal):
        needs.append((a.model.gguf_file, a.model.gguf_sha256, None if a.model.gguf_sha256 else "no sha256 is pinned"))
    if a.llama_cpp and a.llama_cpp.method == "source":
        needs.append((f"llama.cpp-{a.llama_cpp.build}.tar.gz", a.llama_cpp.source_sha256, None))
    return needs


def wanted_artifacts(lock, fleet=None, pins: Pins | None = None) -> list[Wanted]:
    """Each artifact of the lock once (by sha256), with the hosts that need it and its pinned URL."""
    sources = known_sources(fleet, pins)
    wanted: dict[str, Wanted] = {}
    for host in sorted(lock.hosts):
        for name, sha, why in _host_needs(lock.hosts[host]):
            sha = sha.lower() if sha else None
            item = wanted.setdefault(sha or f"name:{name}", Wanted(name, sha, unknown=why))
            item.hosts.append(host)
            if item.unknown is None and item.url is None:
                url, size, no_url = sources.get(sha, (None, None, ""))
                item.url, item.size = url, size
                item.unknown = None if url else (no_url or "no URL is pinned for this sha256 in versions.yaml, "
                                                 "catalog.yaml or the fleet file (a lock older than this r1fleet?)")
    return list(wanted.values())


def cmd_fill(args: argparse.Namespace) -> int:
    fleet = _fleet(args.fleet, required=True)
    lock = _lock(fleet)
    cache = _cache(fleet)
    problems = 0
    for item in wanted_artifacts(lock, fleet):
        hosts = ",".join(item.hosts)
        label = f"{item.name} ({item.sha256[:12] if item.sha256 else 'no sha256'}) for {hosts}"
        if item.unknown:
            problems += 1
            print(f"  not fetched: {label}: {item.unknown}")
            continue
        present = cache.path_for(item.sha256) is not None
        try:
            cache.fetch(item.url, item.sha256, item.name, progress=TerminalProgress(host=hosts), size=item.size)
        except R1FleetError as err:
            problems += 1
            print(f"  failed: {label}: {err}")
            continue
        print(f"  {'cached' if present else 'fetched'}: {label}")
    for (registry, tag), (weights, locked, hosts) in registry_models(lock, fleet).items():
        label = f"{tag} from {registry} for {','.join(hosts)}"
        try:
            fill_registry_model(cache, registry, tag, weights, locked, TerminalProgress(host=",".join(hosts)))
        except (R1FleetError, OSError) as err:
            problems += 1
            print(f"  failed: {label}: {err}")
            continue
        print(f"  cached: {label}")
    print(f"{cache.root}: {'every artifact of the lock is cached' if not problems else f'{problems} not cached'}")
    return 1 if problems else 0


def registry_models(lock, fleet) -> dict[tuple[str, str], tuple[str | None, str | None, list[str]]]:
    """(registry, tag) -> (pinned weights, locked manifest, hosts) of the locked Ollama hosts that take their
    model from a registry."""
    models: dict[tuple[str, str], tuple[str | None, str | None, list[str]]] = {}
    for host in sorted(lock.hosts):
        entry, settings = lock.hosts[host], fleet.hosts.get(host)
        if settings is None or entry.artifacts.model is None:
            continue
        plan = rehearsed(entry.plan, settings)
        if not takes_from_registry(plan, settings, entry.fingerprint.system):
            continue
        locked = entry.artifacts.model.manifest_for(plan.ollama_tag)
        models.setdefault((registry_of(settings), plan.ollama_tag), (weights_digest(plan), locked, []))[2].append(host)
    return models


def fill_registry_model(cache: ArtifactCache, registry: str, tag: str, weights: str | None, locked: str | None,
                        progress) -> None:
    """The tag's manifest (the locked one) and every blob it names, into the cache, as the deploy takes them."""
    if weights is None:
        raise R1FleetError(f"no weights digest is pinned for {tag}", fix="add ollama_digest to catalog.yaml")
    model = cached_manifest(cache, registry, tag, weights, locked)
    name = ModelName.parse(tag)
    for blob in model.blobs:
        cache.fetch(name.blob_url(registry, blob.sha256), blob.sha256, blob_name(tag, blob.sha256),
                    progress=progress, size=blob.size)
