"""A shape-faithful, data-free GGUF of a catalog model: what llama.cpp needs to project its memory.

llama.cpp sizes every buffer from the GGUF's metadata and tensor infos alone, so a file with the real
architecture keys, the real tensor names, shapes and quantization types, and no data (a sparse hole
the size of the real data) lets a real llama-server print its per-device projection of a 42 GB
model that cannot be downloaded here (docs/research/llamacpp-fit-oracle.md).

Tensor types follow llama.cpp's Q4_K_M rules (src/llama-quant.cpp, llama_tensor_get_type): Q4_K by
default; output Q6_K; attn_v and ffn_down Q6_K in the "more bits" layers (the first and last eighth,
and every third layer between); attn_v Q5_K elsewhere in 70B models; norms and biases F32. The sum of
the tensor bytes is checked against the catalog's file size (bench/llamacpp_oracle.py prints it).

The tokenizer is a synthetic SentencePiece-style vocabulary of the model's size (3 control tokens,
256 byte tokens, then fillers): its size sets the embedding shapes, its strings affect no buffer.

Example:
    >>> layout = tensor_layout(load_catalog().find("70b"))
    >>> round(sum(t.nbytes for t in layout) / 2**20)
    40544
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from r1fleet.plan.catalog import Model

# ggml block sizes: (elements per block, bytes per block)
QUANT = {"F32": (1, 4), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
ALIGNMENT = 32  # GGUF's default general.alignment
FILE_TYPE_Q4_K_M = 15
LLAMA3_ROPE_FACTORS = 64  # rope_freqs of Llama 3.1+ (head_dim / 2 entries)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne0 first
    qtype: str

    @property
    def nbytes(self) -> int:
        per_block, block_bytes = QUANT[self.qtype]
        elements = 1
        for n in self.shape:
            elements *= n
        return elements // per_block * block_bytes


def more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the layers Q4_K_M quantizes with more bits."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_layout(model: Model) -> list[TensorInfo]:
    """Every tensor of the model's Q4_K_M GGUF, in llama.cpp's names and ggml shapes."""
    a = model.arch
    q_dim, kv_dim = a.heads * a.head_dim, a.kv_heads * a.head_dim
    big_70b = a.layers == 80
    tensors: list[TensorInfo] = []
    if a.family == "llama":
        tensors.append(TensorInfo("rope_freqs.weight", (LLAMA3_ROPE_FACTORS,), "F32"))
    tensors.append(TensorInfo("token_embd.weight", (a.embedding, a.vocab), "Q4_K"))
    for i in range(a.layers):
        extra = more_bits(i, a.layers)
        v_type = "Q6_K" if extra else ("Q5_K" if big_70b else "Q4_K")
        p = f"blk.{i}."
        tensors += [
            TensorInfo(p + "attn_norm.weight", (a.embedding,), "F32"),
            TensorInfo(p + "attn_q.weight", (a.embedding, q_dim), "Q4_K"),
            TensorInfo(p + "attn_k.weight", (a.embedding, kv_dim), "Q4_K"),
            TensorInfo(p + "attn_v.weight", (a.embedding, kv_dim), v_type),
            TensorInfo(p + "attn_output.weight", (q_dim, a.embedding), "Q4_K"),
            TensorInfo(p + "ffn_norm.weight", (a.embedding,), "F32"),
            TensorInfo(p + "ffn_gate.weight", (a.embedding, a.ffn), "Q4_K"),
            TensorInfo(p + "ffn_up.weight", (a.embedding, a.ffn), "Q4_K"),
            TensorInfo(p + "ffn_down.weight", (a.ffn, a.embedding), "Q6_K" if extra else "Q4_K"),
        ]
        if a.family == "qwen2":  # Qwen2 has q/k/v biases
            tensors += [TensorInfo(p + f"attn_{x}.bias", (d,), "F32") for x, d in (("q", q_dim), ("k", kv_dim), ("v", kv_dim))]
        if a.family == "qwen3":  # Qwen3 has no biases but an RMS norm of each head's q and k (llama.cpp src/llama-arch.cpp)
            tensors += [TensorInfo(p + f"attn_{x}_norm.weight", (a.head_dim,), "F32") for x in ("q", "k")]
    tensors.append(TensorInfo("output_norm.weight", (a.embedding,), "F32"))
    tensors.append(TensorInfo("output.weight", (a.embedding, a.vocab), "Q6_K"))
    return tensors


def _aligned(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def write_header(model: Model, path: Path) -> int:
    """Write the GGUF's header (metadata and tensor infos) to `path`; return the full file size.

    Extending the file to that size (`truncate -s`) leaves the tensor data a sparse hole.
    """
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, TokenType

    a = model.arch
    arch = a.family
    writer = GGUFWriter(str(path), arch)
    writer.add_name(f"{model.name} (r1fleet shape-only stand-in, no weights)")
    writer.add_file_type(FILE_TYPE_Q4_K_M)
    writer.add_context_length(a.context_train)
    writer.add_embedding_length(a.embedding)
    writer.add_block_count(a.layers)
    writer.add_feed_forward_length(a.ffn)
    writer.add_head_count(a.heads)
    writer.add_head_count_kv(a.kv_heads)
    writer.add_key_length(a.head_dim)
    writer.add_value_length(a.head_dim)
    writer.add_layer_norm_rms_eps(1e-5 if arch == "llama" else 1e-6)
    # Llama 3.1: 500000; Qwen2: 10000; Qwen3 (R1-0528's distill): 1e6, its GGUF's qwen3.rope.freq_base
    writer.add_rope_freq_base({"llama": 500000.0, "qwen3": 1000000.0}.get(arch, 10000.0))
    if arch == "llama":
        writer.add_rope_dimension_count(a.head_dim)
    writer.add_vocab_size(a.vocab)
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    tokens += [f"t{i}" for i in range(a.vocab - len(tokens))]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, *([TokenType.BYTE] * 256)]
    types += [TokenType.NORMAL] * (a.vocab - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * a.vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    data = 0
    for t in tensor_layout(model):
        numpy_shape = tuple(reversed(t.shape))
        writer.add_tensor_info(t.name, numpy_shape, np.dtype(np.float32), t.nbytes, raw_dtype=GGMLQuantizationType[t.qtype])
        data += _aligned(t.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return _aligned(path.stat().st_size) + data
