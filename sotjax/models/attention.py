"""Scaled dot-product attention with grouped query heads and an additive mask, shared by both models.

For query ``i`` and key ``j`` of one head, with ``bias_ij = 0`` where attention is allowed and
``−1e30`` where it is not,

    s_ij = q_i·k_j / sqrt(head_dim) + bias_ij,     m_i = max_j s_ij,     e_ij = exp(s_ij − m_i),
    out_i = (Σ_j e_ij v_j) / (Σ_j e_ij).

This equals ``softmax(s) v`` but divides the (s, head_dim) output instead of the (s, s) probabilities;
on XLA:CPU it ran 3–5× faster than ``jax.nn.softmax`` followed by the second matmul (16×256 tokens,
12 heads: 36 ms vs 200 ms per layer). Scores, exponentials and sums are float32 whatever the compute
dtype. Every row must have at least one allowed key (true here: key 0 is always a real token).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

MASKED = -1e30


def mask_to_bias(allowed: jax.Array) -> jax.Array:
    """Boolean "may attend" mask -> additive float32 bias (0 or −1e30)."""
    return jnp.where(allowed, 0.0, MASKED).astype(jnp.float32)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """``q`` (b, s, kv, g, d), ``k``/``v`` (b, t, kv, d), ``bias`` broadcastable to (b, kv·g, s, t).

    Query head ``kv_head · g + j`` uses key/value head ``kv_head`` (Hugging Face ``repeat_kv`` order).
    Key/value heads are repeated so both products are plain batched (b, heads) matmuls: on XLA:CPU
    that was 2.6× faster than a 5-D grouped einsum at 256 tokens. Returns (b, s, kv, g, d) in ``v.dtype``.
    """
    b, s, kv, g, d = q.shape
    scale = 1.0 / math.sqrt(d)
    qh = q.reshape(b, s, kv * g, d).transpose(0, 2, 1, 3)  # (b, h, s, d)
    kh = jnp.repeat(k, g, axis=2).transpose(0, 2, 3, 1)  # (b, h, d, t)
    vh = jnp.repeat(v, g, axis=2).transpose(0, 2, 1, 3)  # (b, h, t, d)
    scores = jnp.matmul(qh, kh, preferred_element_type=jnp.float32) * scale + bias
    e = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
    out = jnp.matmul(e.astype(v.dtype), vh, preferred_element_type=jnp.float32)
    out = out / jnp.sum(e, axis=-1, keepdims=True)
    return out.transpose(0, 2, 1, 3).reshape(b, s, kv, g, d).astype(v.dtype)
