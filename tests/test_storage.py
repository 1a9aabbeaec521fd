"""Embeddings stored as float16, bfloat16 (``np.save`` writes ``|V2``) or float32 ``.npy`` are
memory-mapped, never copied whole, and give the weights of the same values held in float32."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import sotjax
from sotjax import io
from sotjax.synthetic import make_problem


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_npy_storage_dtypes_are_memory_mapped_and_weigh_like_float32(tmp_path, dtype):
    p = make_problem(n=150, n_safe=8, n_harmful=20, dim=12, seed=3)
    stored = p.corpus.astype(dtype)
    np.save(tmp_path / "corpus.npy", stored)
    x, ids = io.read_embeddings(tmp_path / "corpus.npy", None)
    assert isinstance(x, np.memmap) and x.shape == (150, 12) and len(ids) == 150
    np.testing.assert_array_equal(np.asarray(x, np.float32), stored.astype(np.float32))
    config = sotjax.SOTConfig(steps=4)
    got = sotjax.fit(x, p.safe, p.harmful, config)
    want = sotjax.fit(stored.astype(np.float32), p.safe, p.harmful, config)
    np.testing.assert_allclose(got.logits, want.logits, rtol=1e-6, atol=1e-6)


def test_a_two_byte_void_npy_is_read_as_bfloat16_and_other_voids_are_refused(tmp_path):
    np.save(tmp_path / "v4.npy", np.zeros((3, 2), dtype="V4"))
    with pytest.raises(sotjax.SotjaxInputError, match="expected a float array"):
        io.read_embeddings(tmp_path / "v4.npy", None)
