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
from typing import Mapping

from pyinfra import host
from pyinfra.api import operation

from r1fleet.fleet.config import HostConfig
from r1fleet.errors import R1FleetError
from r1fleet.lock.match import fleet_lock, relock_command
from r1fleet.records import HostPlan
from r1fleet.cache.registry import (
    MANIFEST_ACCEPT,
    Blob,
    ModelName,
    RegistryModel,
    ManifestMoved,
    blob_name,
    cached_manifest,
    manifest_name,
)
from r1fleet.operations import fleet_cache
from r1fleet.operations.common import HttpJson, model_names, refusal, verified_fetch_steps
from r1fleet.operations.host_progress import file_poll, file_size, watching
from r1fleet.roles.ollama.decide import registry_of, weights_digest

INCOMING = ".r1fleet-incoming"  # beside blobs/ in the store: Ollama prunes unreferenced files in blobs/ at start


@dataclass(frozen=True)
class RegistryFetch:
    """What the host places: the model with a URL per blob, or why it must not (the weights are not the pinned
    ones)."""

    model: RegistryModel | None = None
    refused: str | None = None


def registry_fetch(plan: HostPlan, settings: HostConfig, model_files: Mapping[str, int]) -> RegistryFetch | None:
    """Controller side, at the install stage. None: the host pulls the model itself (`ollama pull`), because
    it lists the tag already (nothing is read then: a converged host costs the controller nothing) or the
    controller cannot read registry.ollama.ai. With the cache off (R1FLEET_CACHE=off) the controller reads
    only the manifest, and the host downloads the blobs from the registry itself. A blob the host's store holds
    already (`model_files`, the probe's large files by name) is not fetched for it."""
    tag = plan.ollama_tag or ""
    if tag in model_names(host.get_fact(HttpJson, url=f"{settings.local_api('ollama')}/api/tags")):
        return None
    weights = weights_digest(plan)
    if weights is None:
        return RegistryFetch(refused=f"no weights digest is pinned for {tag} (catalog.yaml ollama_digest)")
    registry = registry_of(settings)
    cache = fleet_cache.cache_for(host.data.get("r1fleet_cache_dir")) if fleet_cache.enabled() else None
    locked = locked_manifest(tag)
    try:
        model = cached_manifest(cache, registry, tag, weights, locked)
    except OSError as error:
        if locked:  # `ollama pull` would take whatever manifest the registry serves now
            return RegistryFetch(refused=f"the fleet lock names manifest {locked[:12]} for {tag}, the controller's "
                                         f"cache does not hold it and {registry} cannot be read ({error}) (fix: "
                                         "reach the registry from this machine: the deploy takes the locked manifest "
                                         "when the registry still serves it, or stops with the relock command)")
        if settings.ollama_registry is not None:  # `ollama pull` would go to registry.ollama.ai instead
            return RegistryFetch(refused=f"the controller cannot read {tag} from {registry} ({error}) "
                                         "(fix: check ollama_registry, or reach it from this machine)")
        print(f"[{host.name}] {tag}: the controller cannot read {registry} ({error}); the host pulls it itself",
              file=sys.stderr)
        return None
    except ManifestMoved as error:
        return RegistryFetch(refused=f"{error} (fix: {relock_command(host.name, host.data.get('r1fleet_fleet'))})")
    except R1FleetError as error:
        return RegistryFetch(refused=f"{error} (fix: {error.fix})" if error.fix else str(error))
    name = ModelName.parse(tag)

    def located(blob: Blob) -> Blob:
        upstream = replace(blob, url=name.blob_url(registry, blob.sha256))
        if model_files.get(f"sha256-{blob.sha256}") == blob.size:  # in the host's store already (an alias tag)
            return upstream
        return fleet_cache.from_controller(upstream, blob_name(tag, blob.sha256))
    manifest = fleet_cache.from_controller(replace(model.manifest, url=name.manifest_url(registry)), manifest_name(tag))
    return RegistryFetch(RegistryModel(tag, manifest, tuple(located(blob) for blob in model.blobs)))


def locked_manifest(tag: str) -> str | None:
    """The manifest digest the fleet lock records for this host's `tag`, if any."""
    lock, _ = fleet_lock(host.data.get("r1fleet_fleet"))
    entry = lock.hosts.get(host.name) if lock else None
    model = entry.artifacts.model if entry else None
    return model.manifest_for(tag) if model else None


@operation()
def place_registry_model(fetch: RegistryFetch, tag: str, api: str, models_dir: str, user: str):
    """Put the tag's blobs and manifest in the Ollama store, each file checked against its sha256 before it
    enters the store; the blobs first, the manifest last, so Ollama never lists a tag whose blobs are missing.
    Nothing happens when the server lists the tag already.

    Example: place_registry_model(fetch, tag="deepseek-r1:7b-qwen-distill-q4_K_M", api="http://127.0.0.1:11434",
    models_dir="/var/lib/r1fleet/models/ollama", user="ollama")"""
    if tag in model_names(host.get_fact(HttpJson, url=f"{api}/api/tags")):
        host.noop(f"model {tag} present")
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
        # Whatever else is in incoming was left by another tag or an interrupted run: never moved into the store.
        f'for f in {q(incoming)}/* {q(incoming)}/.[!.]*; do case "${{f##*/}}" in {expected}) ;; '
        f'*) if [ -e "$f" ]; then rm -rf "$f"; fi;; esac; done',
    ]
    for blob in blobs:
        stored, part = q(f"{models_dir}/blobs/sha256-{blob.sha256}"), q(f"{incoming}/sha256-{blob.sha256}")
        # A blob already in the store with its size is kept, as Ollama's own pull does (server/download.go
        # downloadBlob: an existing blob is a cache hit, not verified again).
        get = "; ".join([*verified_fetch_steps(blob.url or "", part, blob.sha256, resume=True, fallback=blob.fallback_url),
                         f"mv -f {part} {stored}"])
        steps.append(f'if [ "$({file_size(stored)})" != "{blob.size}" ]; then {get}; else rm -f {part}; fi')
    part = q(f"{incoming}/manifest")
    # The blobs are in the store: now the manifest, which makes Ollama list the tag.
    steps += [*verified_fetch_steps(manifest.url or "", part, manifest.sha256, fallback=manifest.fallback_url,
                                    header=f"Accept: {MANIFEST_ACCEPT}"),
              f"mv -f {part} {q(path)}", f"rmdir {q(incoming)}"]
    # As the service user: the store is its own, and root writes nothing where that user could have put a link.
    script = f"runuser -u {q(user)} -- sh -c {q('; '.join(steps))}"
    # Each blob's progress, read on the host, whether it comes from the controller's cache or the registry.
    parts = file_poll({blob.sha256[:12]: q(f"{incoming}/sha256-{blob.sha256}") for blob in blobs},
                      sizes={blob.sha256[:12]: blob.size for blob in blobs})
    with watching(tag, parts, resumable=True):
        yield script
