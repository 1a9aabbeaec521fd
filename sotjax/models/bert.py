"""BERT-family encoder (BERT, MiniLM, all-MiniLM-L6-v2) in flax.nnx, inference only, plus pooling.

Embedding: ``e = LN(W_tok[ids] + W_pos[0..s−1] + W_type[0])``. Each post-norm layer:

    a  = LN(h + W_o · Attn(W_q h + b_q, W_k h + b_k, W_v h + b_v))
    h' = LN(a + W_2 · gelu(W_1 a + b_1) + b_2)

with ``LN(x) = γ ⊙ (x − μ)/sqrt(σ² + eps) + β``, exact (erf) GELU, and padded keys masked out.
The sentence embedding is the masked mean of the last layer followed by L2 normalisation,

    u = Σ_t m_t h_t / max(Σ_t m_t, 1e−9),      z = u / max(‖u‖₂, 1e−12),

which is what sentence-transformers' all-MiniLM-L6-v2 (``1_Pooling`` mean tokens + ``Normalize``) does.
Layers are stored stacked and run with ``jax.lax.scan`` like :mod:`sotjax.models.llama`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sotjax.models.attention import grouped_attention, mask_to_bias
from sotjax.models.hidden_states import resolve_layer


@dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT encoder (validated at construction)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "max_position_embeddings", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BertConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"BertConfig: hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(f"BertConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps}")

    @property
    def hidden_dim(self) -> int:
        """Width of the feature vector (= hidden_size)."""
        return self.hidden_size

    def resolve_layer(self, layer: int) -> int:
        """Map a Python-style layer index onto ``0..num_layers`` (0 = embeddings)."""
        return resolve_layer(layer, self.num_layers)


class SelfAttention(nnx.Module):
    """Bidirectional multi-head attention with a key-padding mask."""

    def __init__(self, config: BertConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        linear: dict[str, Any] = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.query = nnx.Linear(d, d, **linear)
        self.key = nnx.Linear(d, d, **linear)
        self.value = nnx.Linear(d, d, **linear)
        self.output = nnx.Linear(d, d, **linear)
        self.output_norm = nnx.LayerNorm(
            d, epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=dtype, rngs=rngs
        )
        self.num_heads = config.num_heads

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        """``x`` (b, s, d); ``key_mask`` (b, s) boolean. Returns ``LN(x + attention(x))``."""
        b, s, d = x.shape
        hd = d // self.num_heads
        q = self.query(x).reshape(b, s, self.num_heads, 1, hd)  # every head is its own kv group
        k = self.key(x).reshape(b, s, self.num_heads, hd)
        v = self.value(x).reshape(b, s, self.num_heads, hd)
        bias = mask_to_bias(key_mask)[:, None, None, :]  # (b, 1, 1, t)
        ctx = grouped_attention(q, k, v, bias).reshape(b, s, d)
        return self.output_norm(x + self.output(ctx))


class EncoderLayer(nnx.Module):
    """Post-norm transformer encoder layer (attention, then GELU feed-forward)."""

    def __init__(self, config: BertConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.attention = SelfAttention(config, dtype=dtype, rngs=rngs)
        self.intermediate = nnx.Linear(d, f, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.output = nnx.Linear(f, d, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.output_norm = nnx.LayerNorm(
            d, epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        a = self.attention(x, key_mask)
        return self.output_norm(a + self.output(jax.nn.gelu(self.intermediate(a), approximate=False)))


class BertModel(nnx.Module):
    """Embeddings → ``num_layers`` encoder layers (stacked, scanned); no pooler head."""

    def __init__(self, config: BertConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        d = config.hidden_size
        emb: dict[str, Any] = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.word_embeddings = nnx.Embed(config.vocab_size, d, **emb)
        self.position_embeddings = nnx.Embed(config.max_position_embeddings, d, **emb)
        self.token_type_embeddings = nnx.Embed(config.type_vocab_size, d, **emb)
        self.embeddings_norm = nnx.LayerNorm(
            d, epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=dtype, rngs=rngs
        )

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> EncoderLayer:
            return EncoderLayer(config, dtype=dtype, rngs=rngs)

        self.layers = make_layers(rngs)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array, layer: int = -1) -> jax.Array:
        """Hidden states (b, s, d) after ``layer`` layers (``-1`` = last, ``0`` = embeddings)."""
        n_layers = self.config.resolve_layer(layer)
        s = input_ids.shape[1]
        if s > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {s} exceeds max_position_embeddings {self.config.max_position_embeddings}"
            )
        positions = jnp.arange(s)
        h = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings(jnp.zeros_like(input_ids))
        )
        h = self.embeddings_norm(h)
        key_mask = attention_mask.astype(bool)
        if n_layers:
            graphdef, stacked = nnx.split(self.layers)
            stacked = jax.tree.map(lambda p: p[:n_layers], stacked)

            def step(x: jax.Array, layer_state: nnx.State) -> tuple[jax.Array, None]:
                return nnx.merge(graphdef, layer_state)(x, key_mask), None

            h, _ = jax.lax.scan(step, h, stacked)
        return h

    def mean_pooled_features(self, input_ids: jax.Array, lengths: jax.Array, layer: int = -1) -> jax.Array:
        """L2-normalised masked mean of the hidden states (b, d), float32."""
        s = input_ids.shape[1]
        mask = jnp.arange(s)[None, :] < lengths[:, None]
        h = self.hidden_states(input_ids, mask, layer).astype(jnp.float32)
        return mean_pool_normalize(h, mask)


def mean_pool_normalize(h: jax.Array, mask: jax.Array) -> jax.Array:
    """``u = Σ_t m_t h_t / max(Σ m_t, 1e−9)``, then ``u / max(‖u‖, 1e−12)``."""
    m = mask.astype(h.dtype)[..., None]
    u = jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    return u / jnp.maximum(jnp.linalg.norm(u, axis=-1, keepdims=True), 1e-12)
