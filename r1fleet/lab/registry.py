"""The lab's Ollama registry: the rehearsal stand-in published on the lab mirror under its tag, as static
files in the layout an Ollama registry answers (r1fleet/cache/registry.py gives Ollama's URLs):

    <mirror>/registry/v2/<namespace>/<model>/manifests/<tag>
    <mirror>/registry/v2/<namespace>/<model>/blobs/sha256:<hex>

So a lab host with `ollama_registry: <mirror>/registry` takes its model the way a real host takes one from
registry.ollama.ai. The model layer is the GGUF unchanged: a registry serves the bytes it was given (only
`ollama create` on a host rewrites a GGUF). Beside it, a Go template layer, as the library's tags carry one: Ollama
then renders the prompt itself and sends it to llama-server's /completion (server/routes.go, llm/llama_server.go
of v0.32.9), the path a real host's chats take. The template (ChatML, the stand-in model's format) has no thinking
field, like the library's tags from before thinking: `think: true` is answered with a 400, as Ollama answers it.
The config blob carries the fields Ollama's own configs carry (model_format, model_family, file_type, rootfs;
server/images.go ConfigV2). The bytes are deterministic, so the manifest's digest is the same on every lab.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from r1fleet.cache.registry import MANIFEST_ACCEPT, MODEL_LAYER, ModelName

CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
TEMPLATE_LAYER = "application/vnd.ollama.image.template"
# Each message in ChatML, then the assistant's turn opened; no .Thinking field, so no thinking capability.
CHATML_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                   "<|im_start|>assistant\n")


def _json(document: dict) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def _blob(blobs: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    path = blobs / f"sha256:{digest}"
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def publish(root: Path, tag: str, gguf: Path, gguf_sha256: str, family: str, file_type: str) -> Path:
    """Publish `gguf` as `tag` under root/registry; returns the manifest's path."""
    name = ModelName.parse(tag)
    base = root / "registry" / "v2" / name.namespace / name.model
    blobs, manifests = base / "blobs", base / "manifests"
    blobs.mkdir(parents=True, exist_ok=True)
    manifests.mkdir(parents=True, exist_ok=True)
    weights = blobs / f"sha256:{gguf_sha256}"
    if not weights.exists():
        weights.symlink_to(gguf)  # the download cache is on disk; the mirror directory is in RAM
    layers = [{"mediaType": MODEL_LAYER, "digest": f"sha256:{gguf_sha256}", "size": gguf.stat().st_size},
              {"mediaType": TEMPLATE_LAYER, **_blob(blobs, CHATML_TEMPLATE.encode())}]
    config = _blob(blobs, _json({"model_format": "gguf", "model_family": family, "model_families": [family],
                                 "file_type": file_type, "architecture": "amd64", "os": "linux",
                                 "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]}}))
    manifest = _json({"schemaVersion": 2, "mediaType": MANIFEST_ACCEPT,
                      "config": {"mediaType": CONFIG_TYPE, **config}, "layers": layers})
    path = manifests / name.tag
    if not path.exists() or path.read_bytes() != manifest:
        path.write_bytes(manifest)
    return path
