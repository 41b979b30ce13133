"""Planning policy: the knobs a fleet file sets fleet-wide (`defaults.policy`) or per host."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from r1fleet.records import Backend, KvType
from r1fleet.plan.catalog import load_catalog


class Policy(BaseModel):
    """How the planner chooses. Every field has a default; a fleet file overrides some of them.

    Example: ``Policy(min_context=8192, min_tokens_per_second=5)``
    """

    model_config = ConfigDict(extra="forbid")

    min_context: int = Field(8192, ge=512, le=1_048_576, description="smallest usable context (tokens)")
    max_context: int = Field(32768, ge=512, le=1_048_576, description="largest context to plan for (tokens)")
    min_tokens_per_second: float = Field(5.0, ge=0, le=10_000, description="reject models estimated slower than this")
    headroom_mib: int = Field(
        512, ge=0, le=65536,
        description="memory kept free on every device (MiB); also the runtime's own fit margin (LLAMA_ARG_FIT_TARGET)",
    )
    kv_types: list[KvType] = Field(["f16", "q8_0"], min_length=1, description="KV cache types allowed, preferred first")
    flash_attention: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: as the runtime decides for the GPU; on/off: force it (a quantized KV cache needs it on)"
    )
    prefer: Literal["largest", "compact", "math", "general"] = Field(
        "largest",
        description="the order models are tried in: largest (most parameters first: of the 8B distills, R1-0528's "
                    "Qwen3-8B), compact (largest, but at one size the distill needing less memory: the Llama 8B), math "
                    "(best AIME 2024 first) or general (generalists before the Qwen-Math distills)",
    )
    model: str | None = Field(None, description="pin a catalog model id (or Ollama tag, or a size like 32b)")
    backend: Backend | None = Field(None, description="force a backend instead of the planner's choice")
    cpu_bandwidth_gbps: float = Field(25.0, gt=0, le=2000, description="system RAM bandwidth for CPU-only speed estimates")

    @field_validator("model")
    @classmethod
    def _model_is_known(cls, value: str | None) -> str | None:
        return known_model(value)

    @model_validator(mode="after")
    def _context_order(self) -> "Policy":
        if self.max_context < self.min_context:
            raise ValueError(
                f"max_context ({self.max_context}) is below min_context ({self.min_context}); raise max_context or lower min_context"
            )
        return self


def known_model(ref: str | None) -> str | None:
    """Validator helper: the reference names a catalog model (id, Ollama tag or size)."""
    if ref is not None:
        try:
            load_catalog().find(ref)
        except KeyError as err:
            raise ValueError(err.args[0]) from None
    return ref
