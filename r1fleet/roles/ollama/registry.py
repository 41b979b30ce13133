"""The planned Ollama model from its registry, fetched once per fleet: the controller reads the tag's
manifest and fetches its blobs into its artifact cache (r1fleet/operations/fleet_cache.py); each host downloads
them from the controller (the registry itself when it cannot reach the controller), checks every sha256,
and places them in its Ollama store as `ollama pull` would (facts in r1fleet/cache/registry.py).

The controller keeps the manifest it first cached for a tag, so a rebuilt host gets the same bytes (the
same digest in /api/tags) even after the registry re-published the tag. With the cache off
(R1FLEET_CACHE=off) each host downloads the blobs from the registry itself. When the controller cannot read
registry.ollama.ai, the host runs `ollama pull` itself, as before; a host whose fleet entry names another
registry (ollama_registry) is stopped with the reason instead.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, replace
from typing import Iterator, Mapping

from pyinfra import host
from pyinfra.api import operation

from r1fleet.fleet.config import HostConfig
from r1fleet.errors import R1FleetError
from r1fleet.lock.match import fleet_lock, relock_command
from r1fleet.records import HostPlan
from r1fleet.cache.registry import (
    MANIFEST_ACCEPT,
    MANIFEST_MAX_BYTES,
    ModelName,
    RegistryModel,
    ManifestMoved,
    blob_name,
    cached_manifest,
    manifest_name,
    ollama_manifest_path,
    stored_manifest_problem,
)
from r1fleet.operations import fleet_cache
from r1fleet.operations.common import HttpJson, exclusive, model_names, refusal, verified_fetch_steps
from r1fleet.operations.host_progress import file_poll, file_size, ollama_blobs_poll, read_on_host, watching
from r1fleet.roles.ollama.decide import pull_command, registry_of, weights_digest

INCOMING = ".r1fleet-incoming"  # beside blobs/ in the store: Ollama prunes unreferenced files in blobs/ at start


@dataclass(frozen=True)
class RegistryFetch:
    """What the host does with the tag: place the model with a URL per blob, pull it itself (`pull`: the
    controller cannot read registry.ollama.ai), or nothing, because the weights are not the pinned ones
    (`refused`)."""

    model: RegistryModel | None = None
    refused: str | None = None
    pull: bool = False


@dataclass(frozen=True)
class RegistrySource:
    """What the controller reads when the placement runs (never while pyinfra prepares it): the tag from its
    registry, with the pinned weights and the manifest the fleet lock names, if any."""

    tag: str
    registry: str
    weights: str
    locked: str | None
    own_registry: bool  # the fleet entry names the registry (ollama_registry): `ollama pull` would not reach it
    model_files: Mapping[str, int]  # the probe's large files in the host's store, by name


def registry_source(plan: HostPlan, settings: HostConfig, model_files: Mapping[str, int]) -> RegistrySource | RegistryFetch:
    """Decided while pyinfra prepares the install stage, reading nothing over the network: where the tag comes
    from, or the refusal when no weights digest is pinned for it. A blob the host's store holds already
    (`model_files`, the probe's large files by name) is not fetched for it."""
    tag = plan.ollama_tag or ""
    weights = weights_digest(plan)
    if weights is None:
        return RegistryFetch(refused=f"no weights digest is pinned for {tag} (catalog.yaml ollama_digest)")
    return RegistrySource(tag, registry_of(settings), weights, locked_manifest(tag),
                          settings.ollama_registry is not None, dict(model_files))


def registry_fetch(state, host, source: RegistrySource) -> RegistryFetch:
    """Controller side, when the placement runs: the manifest (the controller's cached one, or read from the
    registry and kept), and each blob routed through the controller's cache. With the cache off
    (R1FLEET_CACHE=off) the controller reads only the manifest, and the host downloads the blobs from the
    registry itself."""
    tag, registry = source.tag, source.registry
    cache = fleet_cache.cache_for(host.data.get("r1fleet_cache_dir")) if fleet_cache.enabled() else None
    try:
        model = cached_manifest(cache, registry, tag, source.weights, source.locked)
    except OSError as error:
        if source.locked:  # `ollama pull` would take whatever manifest the registry serves now
            return RegistryFetch(refused=f"the fleet lock names manifest {source.locked[:12]} for {tag}, the "
                                         f"controller's cache does not hold it and {registry} cannot be read ({error}) "
                                         "(fix: reach the registry from this machine: the deploy takes the locked "
                                         "manifest when the registry still serves it, or stops with the relock command)")
        if source.own_registry:  # `ollama pull` would go to registry.ollama.ai instead
            return RegistryFetch(refused=f"the controller cannot read {tag} from {registry} ({error}) "
                                         "(fix: check ollama_registry, or reach it from this machine)")
        print(f"[{host.name}] {tag}: the controller cannot read {registry} ({error}); the host pulls it itself",
              file=sys.stderr)
        return RegistryFetch(pull=True)
    except ManifestMoved as error:
        return RegistryFetch(refused=f"{error} (fix: {relock_command(host.name, host.data.get('r1fleet_fleet'))})")
    except R1FleetError as error:
        return RegistryFetch(refused=f"{registry}: {error}")  # its text ends with its fix
    except Exception as error:  # noqa: BLE001 - the registry's odd answer fails this host alone, with the reason
        return RegistryFetch(refused=f"the controller could not take {tag} from {registry}: unexpected "
                                     f"{type(error).__name__}: {error}")
    name = ModelName.parse(tag)
    upstream = [replace(model.manifest, url=name.manifest_url(registry))]
    named = [manifest_name(tag)]
    for blob in model.blobs:
        upstream.append(replace(blob, url=name.blob_url(registry, blob.sha256)))
        named.append(blob_name(tag, blob.sha256))
    # A blob in the host's store already (an alias tag) is taken from there, not fetched.
    routed = [artifact if source.model_files.get(f"sha256-{artifact.sha256}") == artifact.size
              else fleet_cache.from_controller(state, host, artifact, label) if cache is not None else artifact
              for artifact, label in zip(upstream, named)]
    return RegistryFetch(RegistryModel(tag, routed[0], tuple(routed[1:])))


def locked_manifest(tag: str) -> str | None:
    """The manifest digest the fleet lock records for this host's `tag`, if any."""
    lock, _ = fleet_lock(host.data.get("r1fleet_fleet"))
    entry = lock.hosts.get(host.name) if lock else None
    model = entry.artifacts.model if entry else None
    return model.manifest_for(tag) if model else None


@operation()
def place_registry_model(source: RegistrySource | RegistryFetch, tag: str, api: str, models_dir: str, user: str,
                         binary: str):
    """Put the tag's blobs and manifest in the Ollama store, each file checked against its sha256 before it
    enters the store; the blobs first, the manifest last, so Ollama never lists a tag whose blobs are missing.
    Nothing happens when the server lists the tag already. The controller reads the manifest and routes the
    blobs when the operation runs (`source`; a RegistryFetch is one decided already); when it cannot read
    registry.ollama.ai, the host pulls the tag itself (`ollama pull`, with `binary`).

    Example: place_registry_model(source, tag="deepseek-r1:7b-qwen-distill-q4_K_M", api="http://127.0.0.1:11434",
    models_dir="/var/lib/r1fleet/models/ollama", user="ollama", binary="/opt/r1fleet/ollama/0.32.9/bin/ollama")"""
    if tag in model_names(host.get_fact(HttpJson, url=f"{api}/api/tags")):
        host.noop(f"model {tag} present")
        return
    if isinstance(source, RegistryFetch):
        resolved = fleet_cache.WhenRun(source, None)
    else:
        resolved = fleet_cache.WhenRun(None, lambda state, run_host: registry_fetch(state, run_host, source))
    yield from resolved.commands()
    fetch = resolved.value or RegistryFetch(refused=f"nothing to place for {tag}")
    if fetch.pull:
        yield from checked_pull(tag, api, binary, models_dir, source.weights if isinstance(source, RegistrySource) else None)
        return
    if fetch.model is None:
        yield refusal(fetch.refused or f"nothing to place for {tag}")
        return
    q = shlex.quote
    incoming = f"{models_dir}/{INCOMING}"
    path = ModelName.parse(tag).store_manifest(models_dir)
    blobs, manifest = fetch.model.blobs, fetch.model.manifest
    expected = "|".join([*(f"sha256-{blob.sha256}" for blob in blobs), "manifest"])
    steps = [
        # The service's own UMask (the hardened unit's 0077): the modes a pull by the server leaves
        "set -e", "umask 077",
        f"mkdir -p {q(incoming)} {q(models_dir + '/blobs')} {q(path.rsplit('/', 1)[0])}",
        exclusive(models_dir, tag),
        # Whatever else is in incoming was left by another tag or an interrupted run: never moved into the store.
        f'for f in {q(incoming)}/* {q(incoming)}/.[!.]*; do case "${{f##*/}}" in {expected}) ;; '
        f'*) if [ -e "$f" ]; then rm -rf "$f"; fi;; esac; done',
    ]
    for blob in blobs:
        stored, part = q(f"{models_dir}/blobs/sha256-{blob.sha256}"), q(f"{incoming}/sha256-{blob.sha256}")
        # A blob already in the store with its size is kept, as Ollama's own pull does (server/download.go
        # downloadBlob: an existing blob is a cache hit, not verified again).
        get = "; ".join([*verified_fetch_steps(blob.url or "", part, blob.sha256, blob.size, resume=True,
                                               fallback=blob.fallback_url),
                         f"mv -f {part} {stored}"])
        steps.append(f'if [ "$({file_size(stored)})" != "{blob.size}" ]; then {get}; else rm -f {part}; fi')
    part = q(f"{incoming}/manifest")
    # The blobs are in the store: now the manifest, which makes Ollama list the tag.
    steps += [*verified_fetch_steps(manifest.url or "", part, manifest.sha256, manifest.size, fallback=manifest.fallback_url,
                                    header=f"Accept: {MANIFEST_ACCEPT}"),
              f"mv -f {part} {q(path)}", f"rmdir {q(incoming)}"]
    # As the service user: the store is its own, and root writes nothing where that user could have put a link.
    script = f"runuser -u {q(user)} -- sh -c {q('; '.join(steps))}"
    # Each blob's progress, read on the host, whether it comes from the controller's cache or the registry.
    parts = file_poll({blob.sha256[:12]: q(f"{incoming}/sha256-{blob.sha256}") for blob in blobs},
                      sizes={blob.sha256[:12]: blob.size for blob in blobs})
    with watching(tag, parts, resumable=True):
        yield script


def checked_pull(tag: str, api: str, binary: str, models_dir: str, weights: str | None) -> Iterator:
    """An operation's commands: `ollama pull` of the tag, then its weights checked as a placement's are (one model
    layer, the pinned one, nothing but text beside it: r1fleet/cache/registry.py weights_problem), read back from
    the store right after the pull. Other weights, or none pinned to check against, fail the host with the reason
    and take the tag's manifest out of the store, so a restarted server does not list it and the next deploy pulls
    and checks again."""
    with watching(tag, ollama_blobs_poll(models_dir), resumable=True):
        yield pull_command(tag, api, binary)
    check = fleet_cache.WhenRun(None, lambda state, run_host: pulled_weights_problem(run_host, tag, models_dir, weights))
    yield from check.commands()
    if check.value:
        yield f"rm -f {shlex.quote(ollama_manifest_path(models_dir, tag))}; {refusal(check.value)}"


def pulled_weights_problem(run_host, tag: str, models_dir: str, weights: str | None) -> str | None:
    """Controller side, right after the pull: why the tag in the host's store is not the pinned weights, or None."""
    fix = "pin another model, or update catalog.yaml's ollama_digest once you trust the new weights"
    if weights is None:
        return f"no weights digest is pinned for {tag} to check what `ollama pull` brought (fix: {fix})"
    path = ollama_manifest_path(models_dir, tag)
    lines = read_on_host(run_host, f"head -c {MANIFEST_MAX_BYTES + 1} {shlex.quote(path)}")
    if lines is None:
        return f"`ollama pull {tag}` left no manifest to check at {path} (fix: run the deploy again)"
    problem = stored_manifest_problem("\n".join(lines).encode(), weights)
    return f"`ollama pull {tag}` brought other weights than the pinned ones: {problem} (fix: {fix})" if problem else None
