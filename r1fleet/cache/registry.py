"""An Ollama model as its registry serves it: the tag's manifest and the blobs it names, by sha256.

The controller reads the manifest once, fetches every blob into its artifact cache, and each host places
them in its Ollama store exactly as `ollama pull` leaves them (r1fleet/roles/ollama/registry.py). Facts from
Ollama v0.32.9:
- the manifest is GET <registry>/v2/<namespace>/<model>/manifests/<tag> with Accept MANIFEST_ACCEPT, and a
  blob GET <registry>/v2/<namespace>/<model>/blobs/sha256:<hex> (server/images.go pullModelManifest,
  server/download.go downloadBlob); a name without a namespace is in `library` (types/model/name.go);
- a pull writes the manifest's bytes as received, mode 0644, to
  $OLLAMA_MODELS/manifests/<host>/<namespace>/<model>/<tag> (images.go PullModel), and each blob to
  $OLLAMA_MODELS/blobs/sha256-<hex> (manifest/paths.go BlobsPath); the digest /api/tags reports is the
  sha256 of the manifest file's bytes (manifest/manifest.go ParseNamedManifest), so placing the same bytes
  gives the same digest;
- /api/tags reads the manifests on disk at every call (server/model_list_cache.go syncManifests): a model
  placed while the server runs is listed without a restart.

    >>> ModelName.parse("deepseek-r1:70b-llama-distill-q4_K_M").manifest_url("https://registry.ollama.ai")
    'https://registry.ollama.ai/v2/library/deepseek-r1/manifests/70b-llama-distill-q4_K_M'
"""

from __future__ import annotations

import hashlib
import http.client
import re
import urllib.request
from dataclasses import dataclass
from typing import Any

from r1fleet.cache.download import CHUNK, Deadline
from r1fleet.cache.store import ArtifactCache
from r1fleet.errors import R1FleetError
from r1fleet.net import parse_json

DEFAULT_REGISTRY = "https://registry.ollama.ai"
STORE_HOST = "registry.ollama.ai"  # the host of a name without one (types/model/name.go)
MANIFEST_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"
MODEL_LAYER = "application/vnd.ollama.image.model"
MANIFEST_MAX_BYTES = 1 << 20
# What a manifest may say, each bound far above a real one: it nests three levels deep (parse_json's bound is
# 16); the text layers (template, license, ...) and the config are a few KiB; the largest distill's weights
# are 43 GB.
TEXT_LAYER_MAX_BYTES = 1 << 20
MODEL_LAYER_MAX_BYTES = 1 << 38  # 256 GiB


@dataclass(frozen=True)
class ModelName:
    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, name: str) -> "ModelName":
        """`deepseek-r1:7b` or `r1fleet/smollm2:135m`; no tag means `latest`, no namespace `library`. The tag
        follows the last `:` after the last `/` (a host may carry a port), and each part must be what
        types/model/name.go admits (isValidPart, :344-371 of v0.32.9: ASCII letters, digits and `_` first, then
        also `-` and `.`, but no `.` in a namespace, whose tag Ollama would never list): its parts name
        directories of the store.

        >>> ModelName.parse("reg.lan:5000/team/m:q4")
        ModelName(host='reg.lan:5000', namespace='team', model='m', tag='q4')
        """
        slash = name.rfind("/")
        colon = name.rfind(":")
        path, tag = (name[:colon], name[colon + 1:]) if colon > slash else (name, "latest")
        parts = path.split("/")
        parts = [STORE_HOST, "library", *parts][-3:] if len(parts) == 1 else parts
        parts = [STORE_HOST, *parts] if len(parts) == 2 else parts
        valid = (len(parts) == 3 and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,349}(:[0-9]+)?", parts[0])
                 and re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}", parts[1])
                 and all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}", p) for p in (parts[2], tag))
                 and ".." not in name)
        if not valid:
            raise R1FleetError(f"{name!r} is not an Ollama model name",
                               fix="write it as model:tag, namespace/model:tag or host/namespace/model:tag")
        return cls(parts[0], parts[1], parts[2], tag)

    def manifest_url(self, registry: str) -> str:
        return f"{registry.rstrip('/')}/v2/{self.namespace}/{self.model}/manifests/{self.tag}"

    def blob_url(self, registry: str, sha256: str) -> str:
        return f"{registry.rstrip('/')}/v2/{self.namespace}/{self.model}/blobs/sha256:{sha256}"

    def store_manifest(self, models_dir: str) -> str:
        """Where the store keeps this tag's manifest."""
        return f"{models_dir.rstrip('/')}/manifests/{self.host}/{self.namespace}/{self.model}/{self.tag}"


def ollama_manifest_path(models_dir: str, tag: str) -> str:
    """Where Ollama stores a tag's manifest: <models>/manifests/<registry>/<namespace>/<model>/<tag>."""
    return ModelName.parse(tag).store_manifest(models_dir)


def ollama_model_layer(manifest: dict[str, Any]) -> str | None:
    """The hex sha256 of a manifest's model layer (the GGUF blob), as the catalog pins it: the last one, the one
    Ollama loads (v0.32.9 server/images.go GetModel: each model layer replaces the one before)."""
    found = None
    for layer in manifest.get("layers") or []:
        if isinstance(layer, dict) and layer.get("mediaType") == MODEL_LAYER:
            found = str(layer.get("digest", "")).removeprefix("sha256:") or None
    return found


# The layers a distill may carry besides its weights: text Ollama reads as the prompt template, system prompt,
# parameters, license or seed messages (server/images.go GetModel). An adapter (a LoRA applied over the weights),
# a projector, a second model layer or any type Ollama may learn later changes what the pin stands for.
TEXT_LAYERS = frozenset(f"application/vnd.ollama.image.{kind}"
                        for kind in ("template", "system", "params", "license", "messages", "prompt"))


# The manifest fields Ollama reads (manifest/manifest.go); Go's encoding/json matches a key to a field in any case
# and the last one wins, so "MediaType" beside "mediaType" is what Ollama takes and Python does not.
MANIFEST_FIELDS = ("schemaVersion", "mediaType", "config", "layers", "digest", "size", "from", "name", "manifests")


def spelling_problem(value: Any) -> str | None:
    """Why a manifest could be read otherwise by Ollama than here, or None: a key spelled as one of Ollama's fields
    in another case, two keys alike but for case, or a manifest list (its children are other manifests)."""
    if isinstance(value, list):
        return next((problem for item in value if (problem := spelling_problem(item))), None)
    if not isinstance(value, dict):
        return None
    seen: dict[str, str] = {}
    for key in value:
        lower = str(key).lower()
        if lower in seen:
            return f"it has the key {key!r} beside {seen[lower]!r} (Ollama reads keys in any case)"
        seen[lower] = key
        known = next((field for field in MANIFEST_FIELDS if field.lower() == lower), None)
        if known is not None and key != known:
            return f"it spells {known!r} as {key!r} (Ollama reads keys in any case)"
    if "manifests" in value:
        return "it is a manifest list, not a manifest"
    return next((problem for item in value.values() if (problem := spelling_problem(item))), None)


def weights_problem(manifest: Any, weights_sha256: str) -> str | None:
    """Why a manifest does not serve exactly the pinned weights, or None: one model layer, the pinned one, and
    no layer but text besides it, every key as Ollama spells it."""
    if problem := spelling_problem(manifest):
        return problem
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(layers, list):
        return "it lists no layers"
    kinds = [layer.get("mediaType") if isinstance(layer, dict) else None for layer in layers]
    models = [layer for layer, kind in zip(layers, kinds) if kind == MODEL_LAYER]
    others = sorted({str(kind) for kind in kinds if kind != MODEL_LAYER and kind not in TEXT_LAYERS})
    if len(models) != 1:
        return f"it has {len(models)} model layers, not one"
    if others:
        return f"it adds {', '.join(others)} to the weights"
    weights = ollama_model_layer(manifest)
    if weights != weights_sha256:
        return f"its weights are {weights}, catalog.yaml pins {weights_sha256}"
    return None


def stored_manifest_problem(data: bytes, weights_sha256: str) -> str | None:
    """Why a manifest in a host's store (what `ollama pull` wrote) does not serve exactly the pinned weights, or
    None: the registry's rule (weights_problem) on bytes read back from the host, bounded as a registry's answer."""
    if len(data) > MANIFEST_MAX_BYTES:
        return f"its manifest is over {MANIFEST_MAX_BYTES:,} bytes, which no manifest is"
    try:
        document = parse_json(data)
    except ValueError as err:
        return f"its manifest is not plain JSON ({err})"
    return weights_problem(document, weights_sha256)


@dataclass(frozen=True)
class Blob:
    """One file of the model, by sha256; `url` where the host fetches it, `fallback_url` when that fails."""

    sha256: str
    size: int
    url: str | None = None
    fallback_url: str | None = None


@dataclass(frozen=True)
class RegistryModel:
    """A tag as the registry served it: its manifest (itself a blob, by the sha256 of its bytes) and the
    config and layers it names."""

    tag: str
    manifest: Blob
    blobs: tuple[Blob, ...]


def _digest(text: Any) -> str:
    """The hex of `sha256:<64 hex>`: it names files on the hosts, so nothing else passes (ValueError)."""
    if not isinstance(text, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", text):
        raise ValueError(f"{text!r} is not a sha256 digest")
    return text.removeprefix("sha256:")


def _size(layer: Any, limit: int) -> int:
    """A layer's `size`: a whole number of bytes from 0 to `limit` (not a float, a bool or a string of digits)."""
    size = layer.get("size") if isinstance(layer, dict) else None
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= limit:
        raise ValueError(f"size {size!r} is not a number of bytes from 0 to {limit:,}")
    return size


def _blobs(data: bytes) -> tuple[dict[str, Any], tuple[Blob, ...]]:
    """A manifest's document and the blobs it names (config, then layers); ValueError when it is not an
    Ollama manifest, or says what no manifest says (a size past its bound)."""
    document = parse_json(data)
    if not isinstance(document, dict) or not isinstance(document.get("layers"), list):
        raise ValueError("no config and layers")
    blobs = []
    for layer in [document.get("config"), *document["layers"]]:
        if not isinstance(layer, dict):
            raise ValueError(f"{layer!r} is not a layer")
        limit = MODEL_LAYER_MAX_BYTES if layer.get("mediaType") == MODEL_LAYER else TEXT_LAYER_MAX_BYTES
        blobs.append(Blob(_digest(layer.get("digest")), _size(layer, limit)))
    return document, tuple(blobs)


def read_manifest(data: bytes, tag: str, weights_sha256: str) -> RegistryModel:
    """The model a manifest describes, refused (R1FleetError) unless its weights are the pinned ones: a
    registry can re-point a tag (deepseek-r1:8b changed model in May 2025, catalog.yaml)."""
    try:
        document, blobs = _blobs(data)
    except ValueError as err:
        raise R1FleetError(f"the registry's manifest for {tag} is not an Ollama manifest ({err})",
                           fix="check the registry URL (ollama_registry)") from None
    problem = weights_problem(document, weights_sha256)
    if problem:
        raise R1FleetError(f"the registry's {tag} is not the pinned model: {problem}",
                           fix="the tag was re-pointed upstream: pin another model, or update catalog.yaml once you "
                               "trust the new weights")
    manifest = Blob(hashlib.sha256(data).hexdigest(), len(data))
    return RegistryModel(tag, manifest, blobs)


def ollama_blobs(data: bytes) -> list[str]:
    """The sha256 of every blob a manifest names (config and layers); [] when it is not a manifest."""
    try:
        return [blob.sha256 for blob in _blobs(data)[1]]
    except ValueError:
        return []


def fetch_manifest(registry: str, tag: str, timeout_s: float = 20.0) -> bytes:
    """The tag's manifest from the registry, as bytes (their sha256 is the digest Ollama will report): at most
    MANIFEST_MAX_BYTES, all of it within `timeout_s` (OSError when the registry cannot be read in that time)."""
    request = urllib.request.Request(ModelName.parse(tag).manifest_url(registry),
                                     headers={"Accept": MANIFEST_ACCEPT, "User-Agent": "r1fleet"})
    data = bytearray()
    try:
        with Deadline(timeout_s) as deadline, deadline.open(request, timeout=timeout_s) as response:
            while len(data) <= MANIFEST_MAX_BYTES and (chunk := response.read1(min(CHUNK, MANIFEST_MAX_BYTES + 1))):
                data += chunk
    except http.client.HTTPException as err:  # a broken answer is the registry not read, as a refused connection
        raise OSError(f"{request.full_url}: {err!r}") from None
    if deadline.expired:
        raise OSError(f"{request.full_url}: no whole answer within {timeout_s:g} s")
    if len(data) > MANIFEST_MAX_BYTES:  # a manifest is a few hundred bytes: this is not one
        raise R1FleetError(f"{request.full_url} answers more than {MANIFEST_MAX_BYTES} bytes, not a manifest",
                           fix="check the registry URL (ollama_registry)")
    return bytes(data)


def manifest_name(tag: str) -> str:
    """The name of a tag's manifest in the controller's cache (`r1fleet cache status`)."""
    return f"{tag} (manifest)"


def blob_name(tag: str, sha256: str) -> str:
    """The name of one of a tag's blobs in the controller's cache."""
    return f"{tag} blob {sha256[:12]}"


def manifest_key(registry: str, tag: str) -> str:
    """The name under which the controller's cache keeps the manifest it took for `tag` from `registry`."""
    return f"{registry.rstrip('/')} {tag} manifest"


class ManifestMoved(R1FleetError):
    """The registry serves another manifest for a locked tag, and the cache no longer holds the locked one."""


def cached_manifest(cache: ArtifactCache | None, registry: str, tag: str, weights_sha256: str,
                    locked: str | None = None, fetch=None) -> RegistryModel:
    """The tag's manifest: the one the fleet lock names, else the one the cache took for the tag while its
    weights are still the pinned ones (catalog.yaml may re-pin a tag), read from the registry only when the
    cache lacks it, and then kept (no cache: always read). R1FleetError when the weights are not the pinned
    ones; ManifestMoved when the registry's is not the locked one (it is kept, so a relock takes it); OSError
    when the registry cannot be read."""
    key = manifest_key(registry, tag)
    wanted = locked or (cache.recall(key) if cache else None)
    kept = cache.path_for(wanted) if cache and wanted else None
    model = None
    if kept:
        try:
            model = read_manifest(kept.read_bytes(), tag, weights_sha256)
        except R1FleetError:
            if locked:
                raise
    if model is None:
        data = (fetch or fetch_manifest)(registry, tag)
        model = read_manifest(data, tag, weights_sha256)
        if cache:
            cache.remember(key, cache.put(data, manifest_name(tag)))
    if locked and model.manifest.sha256 != locked:
        raise ManifestMoved(f"{registry} now serves manifest {model.manifest.sha256[:12]} for {tag}; the fleet lock "
                            f"has {locked[:12]}, which this controller's cache does not hold",
                            fix="relock the host to take the registry's (the same weights), or restore the cache")
    return model
