"""Stage 2 building blocks: LoRA on the nnx Llama (init, freeze, merge, bad targets) and the Eq. 8 loss."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sotjax.errors import SotjaxInputError
from sotjax.finetune.causal_lm import random_causal_lm
from sotjax.finetune.lora import LoRAConfig, apply_lora, lora_modules, merge_lora, split_lora
from sotjax.finetune.loss import eq8_loss, response_nll, weighted_nll_sum
from sotjax.models.llama import LlamaConfig

TINY = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2)


def _batch(seed: int = 0, b: int = 3, s: int = 7) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TINY.vocab_size, (b, s))
    lengths = np.array([s, s - 2, s - 1])[:b]
    prompt = np.array([2, 3, 1])[:b]
    pos = np.arange(s)[None]
    attn = (pos < lengths[:, None]).astype(np.int32)
    loss_mask = ((pos >= prompt[:, None]) & (pos < lengths[:, None])).astype(np.int32)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(attn), "loss_mask": jnp.asarray(loss_mask),
            "weight": jnp.asarray([0.5, 2.0, 1.0][:b], jnp.float32), "valid": jnp.ones((b,), jnp.float32)}


def test_lora_at_init_leaves_outputs_unchanged_and_only_adapters_train():
    model = random_causal_lm(TINY, seed=3)
    batch = _batch()
    before = np.asarray(model(batch["input_ids"], batch["attention_mask"]))
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")), seed=1)
    after = np.asarray(model(batch["input_ids"], batch["attention_mask"]))
    np.testing.assert_array_equal(before, after)
    _, lora, frozen = split_lora(model)
    shapes = {"/".join(map(str, p)): v.shape for p, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(lora))
              if True}
    assert len(shapes) == 6, shapes
    assert all(s[0] == TINY.num_layers for s in shapes.values())
    mods = lora_modules(model)
    assert mods["q_proj"].lora_a[...].shape == (2, 16, 4) and mods["q_proj"].lora_b[...].shape == (2, 4, 16)
    assert mods["v_proj"].lora_b[...].shape == (2, 4, 8)  # 2 KV heads × head_dim 4
    assert not any(isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(
        x, nnx.Variable)))


def test_merge_equals_adapted_model():
    model = random_causal_lm(TINY, seed=4)
    apply_lora(model, LoRAConfig(rank=2, alpha=16), seed=2)
    for m in lora_modules(model).values():
        m.lora_b[...] = jnp.asarray(np.random.default_rng(0).normal(0, 0.3, m.lora_b[...].shape), jnp.float32)
    batch = _batch()
    adapted = np.asarray(model(batch["input_ids"], batch["attention_mask"]))
    merged = merge_lora(model)
    assert lora_modules(merged) == {} and len(lora_modules(model)) == 2  # the original keeps its adapters
    np.testing.assert_allclose(np.asarray(merged(batch["input_ids"], batch["attention_mask"])), adapted, atol=2e-5)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(rank=0), "--lora-rank"), (dict(rank=-3), "--lora-rank"), (dict(alpha=0), "--lora-alpha"),
    (dict(targets=("q_proj", "qkv")), "unknown target module 'qkv'"), (dict(targets=()), "names no module"),
    (dict(dropout=0.1), "dropout"),
])
def test_bad_lora_config_is_one_line(kwargs, needle):
    with pytest.raises(SotjaxInputError) as err:
        LoRAConfig(**kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_model_without_projections_is_refused():
    from sotjax.models.bert import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=30, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2),
                     rngs=nnx.Rngs(0))
    with pytest.raises(SotjaxInputError, match="no projection 'q_proj'"):
        apply_lora(bert, LoRAConfig(rank=2))
    with pytest.raises(SotjaxInputError, match="not a Llama-family decoder"):
        apply_lora(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), LoRAConfig(rank=2))


def test_eq8_hand_computed_uniform_logits():
    """Uniform logits: every response token costs log V, so nll_i = log V and L = mean_i(t_i) · log V."""
    v = 5
    ids = jnp.asarray([[1, 2, 3, 4], [0, 1, 2, 0]])
    loss_mask = jnp.asarray([[0, 0, 1, 1], [0, 1, 1, 0]])  # row 0: prompt 2 tokens; row 1: pad at the end
    batch = {"input_ids": ids, "loss_mask": loss_mask, "weight": jnp.asarray([3.0, 1.0]), "valid": jnp.ones(2)}
    logits = jnp.zeros((2, 4, v))
    nll, count = response_nll(logits, ids, loss_mask)
    np.testing.assert_allclose(np.asarray(nll), [math.log(v)] * 2, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(count), [2, 2])
    np.testing.assert_allclose(float(eq8_loss(logits, batch)), (3 + 1) / 2 * math.log(v), rtol=1e-6)


def test_eq8_hand_computed_masking_and_weights():
    """Non-uniform logits, worked by hand: token probabilities are chosen so each NLL is a known log."""
    # vocab 2: logits (0, log 3) give p(1) = 3/4, p(0) = 1/4
    a = math.log(3.0)
    logits = jnp.asarray([[[0, a], [0, a], [0, a]],
                          [[0, a], [0, a], [0, a]]], jnp.float32)
    ids = jnp.asarray([[0, 1, 0], [1, 1, 1]])
    loss_mask = jnp.asarray([[0, 1, 1], [0, 0, 1]])
    # row 0 predicts token 1 (−log 3/4) and token 0 (−log 1/4): nll_0 = (log 4/3 + log 4)/2
    # row 1 predicts only its last token 1 (the middle one is prompt): nll_1 = log 4/3
    nll0 = (math.log(4 / 3) + math.log(4)) / 2
    nll1 = math.log(4 / 3)
    batch = {"input_ids": ids, "loss_mask": loss_mask, "weight": jnp.asarray([0.5, 1.5]), "valid": jnp.ones(2)}
    np.testing.assert_allclose(np.asarray(response_nll(logits, ids, loss_mask)[0]), [nll0, nll1], rtol=1e-6)
    np.testing.assert_allclose(float(eq8_loss(logits, batch)), (0.5 * nll0 + 1.5 * nll1) / 2, rtol=1e-6)
    # a padding row (valid 0) changes neither the sum nor the row count
    padded = {k: jnp.concatenate([v, v[:1]]) for k, v in batch.items()}
    padded["valid"] = jnp.asarray([1.0, 1.0, 0.0])
    total, rows = weighted_nll_sum(jnp.concatenate([logits, logits[:1]]), padded)
    np.testing.assert_allclose([float(total), float(rows)], [0.5 * nll0 + 1.5 * nll1, 2.0], rtol=1e-6)


def test_accumulation_equals_one_big_batch():
    """Σ over micro-batches / Σ rows == the loss of the concatenated batch."""
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 6, 9)), jnp.float32)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 9, (4, 6)))
    mask = jnp.asarray([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    batch = {"input_ids": ids, "loss_mask": mask, "weight": jnp.asarray([0.2, 1.0, 2.5, 0.3]), "valid": jnp.ones(4)}
    whole = float(eq8_loss(logits, batch))
    parts = [weighted_nll_sum(logits[i:i + 2], {k: v[i:i + 2] for k, v in batch.items()}) for i in (0, 2)]
    np.testing.assert_allclose(sum(float(p[0]) for p in parts) / sum(float(p[1]) for p in parts), whole, rtol=1e-6)


def test_gradient_matches_central_finite_differences():
    model = random_causal_lm(TINY, seed=5)
    apply_lora(model, LoRAConfig(rank=2, alpha=4), seed=3)
    rng = np.random.default_rng(7)
    for m in lora_modules(model).values():  # B = 0 would make ∂L/∂A vanish
        m.lora_b[...] = jnp.asarray(rng.normal(0, 0.5, m.lora_b[...].shape), jnp.float32)
    graphdef, lora, frozen = split_lora(model)
    batch = _batch(seed=2)

    def loss(params):
        m = nnx.merge(graphdef, params, frozen)
        return eq8_loss(m(batch["input_ids"], batch["attention_mask"]), batch)

    loss = jax.jit(loss)
    grad = jax.jit(jax.grad(loss))(lora)
    direction = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), lora)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction),
                                                             strict=True))
    eps = 2e-3
    plus = jax.tree.map(lambda p, d: p + eps * d, lora, direction)
    minus = jax.tree.map(lambda p, d: p - eps * d, lora, direction)
    numeric = (float(loss(plus)) - float(loss(minus))) / (2 * eps)
    assert abs(analytic) > 1e-3
    np.testing.assert_allclose(numeric, analytic, rtol=2e-2)
    # per-coordinate check on a few entries of one adapter
    leaf_grad = np.asarray(grad["model"]["layers"]["self_attn"]["q_proj"]["lora_a"][...])
    for idx in [(0, 0, 0), (1, 5, 1), (0, 15, 1)]:
        def shifted(delta, idx=idx):
            p = jax.tree.map(lambda x: x, lora)
            arr = p["model"]["layers"]["self_attn"]["q_proj"]["lora_a"]
            arr[...] = arr[...].at[idx].add(delta)
            return float(loss(p))
        fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
        np.testing.assert_allclose(fd, leaf_grad[idx], rtol=5e-2, atol=2e-4)
