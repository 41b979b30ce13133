"""The shape-only GGUFs the llama.cpp oracle loads: the same tensors, types and bytes as the real files."""

from __future__ import annotations

import pytest

from r1fleet.plan.catalog import load_catalog
from r1fleet.lab.shape_gguf import more_bits, tensor_layout, write_header

METADATA_MIB = 8  # the real files' metadata: tokenizer (Llama-3: 7.5 MiB, Qwen2: 5.7 MiB) and chat template


@pytest.mark.parametrize("model", load_catalog().models, ids=lambda m: m.size_label)
def test_tensor_bytes_match_the_real_file(model):
    """Q4_K_M's type rules over the real shapes give the real file's size, less its metadata."""
    data = sum(t.nbytes for t in tensor_layout(model))
    assert 0 < model.gguf.size_bytes - data < METADATA_MIB * 2**20


def test_70b_blocks_are_the_two_sizes_of_the_published_load_log():
    """41 blocks (20 of them Q6_K-heavy) are the 20038.81 MiB CUDA0 buffer of the 70B on two 3090s."""
    layout = tensor_layout(load_catalog().find("70b"))
    first_41 = sum(t.nbytes for t in layout if t.name.startswith("blk.") and int(t.name.split(".")[1]) < 41)
    rope = next(t.nbytes for t in layout if t.name == "rope_freqs.weight")
    assert round((first_41 + rope) / 2**20, 2) == 20038.81
    assert sum(more_bits(i, 80) for i in range(41)) == 20


def test_header_reads_back_with_every_tensor(tmp_path):
    gguf = pytest.importorskip("gguf")
    model = load_catalog().find("1.5b")
    path = tmp_path / "m.gguf"
    size = write_header(model, path)
    assert path.stat().st_size < 8 * 2**20 < size  # the header only; the data is a hole to add
    import os

    os.truncate(path, size)
    reader = gguf.GGUFReader(str(path))
    assert len(reader.tensors) == len(tensor_layout(model))
    assert sum(int(t.n_bytes) for t in reader.tensors) == sum(t.nbytes for t in tensor_layout(model))
    assert reader.fields["general.architecture"].contents() == "qwen2"
