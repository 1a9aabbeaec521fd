"""Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2-style) in flax.nnx, inference only.

One block, for the hidden state ``h`` (batch b, sequence s, width d):

    a = h + W_o · Attn(RoPE(W_q · n(h)), RoPE(W_k · n(h)), W_v · n(h))     (pre-norm attention)
    h' = a + W_down · (silu(W_gate · n(a)) ⊙ W_up · n(a))                  (SwiGLU MLP)

with RMSNorm ``n(x) = g ⊙ x / sqrt(mean(x²) + eps)`` computed in float32, grouped-query attention
(``num_heads`` query heads share ``num_kv_heads`` key/value heads, ``group = num_heads / num_kv_heads``),
a causal mask combined with a key-padding mask (computed as in :mod:`sotjax.models.attention`),

    Attn(q, k, v)_i = Σ_j softmax_j(q_i·k_j / sqrt(head_dim) + mask_ij) v_j ,

and rotary position embeddings in the Hugging Face "rotate-half" layout: for position ``p`` and
frequency ``θ_f = 1 / (base^(2f/head_dim) · factor_f)``, ``f < head_dim/2``,

    RoPE(x)[f]          = x[f] cos(pθ_f) − x[f + h/2] sin(pθ_f)
    RoPE(x)[f + h/2]    = x[f + h/2] cos(pθ_f) + x[f] sin(pθ_f).

``factor_f`` is 1 for plain RoPE, the scale for linear scaling, and the Llama-3 smooth interpolation
factors (``rope_freq_factors``). GGUF files store Q/K in llama.cpp's interleaved layout; the
GGUF loader undoes that permutation, so this module only knows the Hugging Face layout.

Layers are stored stacked (leading axis = layer) and run with ``jax.lax.scan``, so a 30-layer model
compiles one block instead of thirty. ``hidden_states(ids, mask, layer)`` follows the indexing of
Hugging Face's ``output_hidden_states``: ``0`` is the token embedding, ``i`` the output of block ``i``
(no final norm) for ``0 < i < L``, and ``L`` (or ``-1``) the output of the last block *after the
final RMSNorm* (``last_hidden_state``). Negative values count from ``L`` as in Python.

Incremental decoding (:mod:`sotjax.finetune.generate`): :meth:`LlamaModel.init_cache` allocates a
key/value cache (L, b, T, kv, head_dim) and :meth:`LlamaModel.cached_hidden_states` runs tokens
at cache slots ``index ..`` with per-row RoPE positions and a key mask over the slots (left-padded
batches), writing their rotated keys and values into the cache. The methods above are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sotjax.models.attention import grouped_attention, mask_to_bias
from sotjax.models.hidden_states import resolve_layer


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-family decoder (validated at construction)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0 => hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_freq_factors: tuple[float, ...] | None = None  # per-frequency divisors (len head_dim/2)
    attention_bias: bool = False  # biases on q/k/v (Qwen2); o_proj never has one here
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ValueError("LlamaConfig: hidden_size must be divisible by num_heads when head_dim is not given")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be a positive even int, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ValueError(f"LlamaConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_freq_factors is not None:
            factors = tuple(float(f) for f in self.rope_freq_factors)
            if len(factors) != self.head_dim // 2 or not all(f > 0 for f in factors):
                raise ValueError(
                    f"LlamaConfig.rope_freq_factors must hold {self.head_dim // 2} positive values, got {len(factors)}"
                )
            object.__setattr__(self, "rope_freq_factors", factors)

    @property
    def hidden_dim(self) -> int:
        """Width of the feature vector (= hidden_size)."""
        return self.hidden_size

    def resolve_layer(self, layer: int) -> int:
        """Map a Python-style layer index onto ``0..num_layers`` (see the module docstring)."""
        return resolve_layer(layer, self.num_layers)


def rope_inverse_frequencies(config: LlamaConfig) -> jax.Array:
    """θ_f = base^(−2f/head_dim) / factor_f, f = 0 .. head_dim/2 − 1 (float32)."""
    exponents = jnp.arange(0, config.head_dim, 2, dtype=jnp.float32) / config.head_dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    if config.rope_freq_factors is not None:
        inv_freq = inv_freq / jnp.asarray(config.rope_freq_factors, dtype=jnp.float32)
    return inv_freq


def llama3_freq_factors(
    head_dim: int,
    rope_theta: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> tuple[float, ...]:
    """Llama-3.1 RoPE scaling written as per-frequency divisors ``θ_f / θ'_f``.

    Wavelength λ_f = 2π/θ_f. Long wavelengths (λ > L/low) are divided by ``factor``, short ones
    (λ < L/high) are kept, and the band between is interpolated with
    ``s = (L/λ − low)/(high − low)``: θ' = (1 − s)·θ/factor + s·θ.
    """
    import numpy as np

    inv_freq = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * np.pi / inv_freq
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    scaled = np.where(medium, smoothed, scaled)
    return tuple(float(x) for x in inv_freq / scaled)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on ``x`` (b, s, heads, head_dim) with ``cos``/``sin`` (s, head_dim/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def apply_rope_rows(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """:func:`apply_rope` with per-row tables: ``cos``/``sin`` (b, s, head_dim/2) (left-padded batches)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class RMSNorm(nnx.Module):
    """``g ⊙ x / sqrt(mean(x²) + eps)``, statistics in float32."""

    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype = jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), dtype=dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query causal self-attention with RoPE."""

    def __init__(self, config: LlamaConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, hd = config.hidden_size, config.head_dim
        linear: dict[str, Any] = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d, config.num_heads * hd, use_bias=config.attention_bias, **linear)
        self.k_proj = nnx.Linear(d, config.num_kv_heads * hd, use_bias=config.attention_bias, **linear)
        self.v_proj = nnx.Linear(d, config.num_kv_heads * hd, use_bias=config.attention_bias, **linear)
        self.o_proj = nnx.Linear(config.num_heads * hd, d, use_bias=False, **linear)
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, hd

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array) -> jax.Array:
        """``x`` (b, s, d); ``bias`` (b, 1, s, s) additive mask (0 allowed, −1e30 masked)."""
        b, s, _ = x.shape
        kv, group, hd = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = apply_rope(self.q_proj(x).reshape(b, s, self.num_heads, hd), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, s, kv, hd), cos, sin)
        v = self.v_proj(x).reshape(b, s, kv, hd)
        q = q.reshape(b, s, kv, group, hd)  # query head h = kv_head * group + g (HF repeat_kv order)
        out = grouped_attention(q, k, v, bias).reshape(b, s, self.num_heads * hd)
        return self.o_proj(out)

    def cached(self, x: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array, k_cache: jax.Array,
               v_cache: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Incremental attention: ``x`` (b, s, d) are the tokens at cache slots ``index .. index + s − 1``.

        ``cos``/``sin`` (b, s, head_dim/2) are per-row RoPE tables, ``k_cache``/``v_cache`` (b, T, kv, hd)
        this layer's cache (keys already rotated), ``bias`` (b, 1, s, T). The new keys/values are written
        into the cache before attending. Returns ``(output (b, s, d), keys, values)``, the updated cache.
        """
        b, s, _ = x.shape
        kv, group, hd = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = apply_rope_rows(self.q_proj(x).reshape(b, s, self.num_heads, hd), cos, sin)
        k = apply_rope_rows(self.k_proj(x).reshape(b, s, kv, hd), cos, sin).astype(k_cache.dtype)
        v = self.v_proj(x).reshape(b, s, kv, hd).astype(v_cache.dtype)
        zero = jnp.zeros((), jnp.int32)
        start = (zero, jnp.asarray(index, jnp.int32), zero, zero)
        keys = jax.lax.dynamic_update_slice(k_cache, k, start)
        values = jax.lax.dynamic_update_slice(v_cache, v, start)
        q = q.reshape(b, s, kv, group, hd)
        out = grouped_attention(q, keys, values, bias).reshape(b, s, self.num_heads * hd)
        return self.o_proj(out), keys, values


class MLP(nnx.Module):
    """SwiGLU: ``W_down (silu(W_gate x) ⊙ W_up x)``."""

    def __init__(self, config: LlamaConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        linear: dict[str, Any] = dict(use_bias=config.mlp_bias, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.gate_proj = nnx.Linear(d, f, **linear)
        self.up_proj = nnx.Linear(d, f, **linear)
        self.down_proj = nnx.Linear(f, d, **linear)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nnx.Module):
    """Pre-norm residual block: attention then SwiGLU MLP."""

    def __init__(self, config: LlamaConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias)
        return x + self.mlp(self.post_attention_layernorm(x))

    def cached(self, x: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array, k_cache: jax.Array,
               v_cache: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The block on tokens at cache slots ``index ..`` (:meth:`Attention.cached`): ``(x', cache_k, cache_v)``."""
        a, k, v = self.self_attn.cached(self.input_layernorm(x), cos, sin, bias, k_cache, v_cache, index)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class LlamaModel(nnx.Module):
    """Token embedding → ``num_layers`` decoder blocks (stacked, scanned) → final RMSNorm.

    Parameter names mirror Hugging Face's ``LlamaModel`` (``embed_tokens``, ``layers.<...>``, ``norm``)
    with linear kernels stored as (in, out) and a leading layer axis on everything under ``layers``.
    """

    def __init__(self, config: LlamaConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> DecoderBlock:
            return DecoderBlock(config, dtype=dtype, rngs=rngs)

        self.layers = make_layers(rngs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array, layer: int = -1) -> jax.Array:
        """Hidden states (b, s, d) at ``layer`` for right-padded ``input_ids`` (b, s).

        ``attention_mask`` (b, s) is 1 on real tokens, 0 on padding. Positions are ``0..s−1``, so
        right padding leaves every real token's state unchanged (causal attention never sees it).
        """
        n_blocks = self.config.resolve_layer(layer)
        b, s = input_ids.shape
        h = self.embed_tokens(input_ids)
        positions = jnp.arange(s, dtype=jnp.float32)
        angles = positions[:, None] * rope_inverse_frequencies(self.config)[None, :]
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        causal = jnp.tril(jnp.ones((s, s), dtype=bool))
        keys = attention_mask.astype(bool)[:, None, None, :]
        bias = mask_to_bias(causal[None, None] & keys)  # (b, 1, s, s): query q may see key t

        if n_blocks:
            graphdef, stacked = nnx.split(self.layers)
            stacked = jax.tree.map(lambda p: p[:n_blocks], stacked)

            def step(x: jax.Array, block_state: nnx.State) -> tuple[jax.Array, None]:
                return nnx.merge(graphdef, block_state)(x, cos, sin, bias), None

            h, _ = jax.lax.scan(step, h, stacked)
        if n_blocks == self.config.num_layers:
            h = self.norm(h)
        return h

    def last_token_features(self, input_ids: jax.Array, lengths: jax.Array, layer: int = -1) -> jax.Array:
        """State at the last real token, ``z_i = H[i, lengths_i − 1]`` (b, d), in float32."""
        s = input_ids.shape[1]
        mask = jnp.arange(s)[None, :] < lengths[:, None]
        h = self.hidden_states(input_ids, mask, layer)
        idx = jnp.clip(lengths - 1, 0, s - 1)
        return jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0].astype(jnp.float32)

    def init_cache(self, batch: int, length: int, dtype: Any = None) -> tuple[jax.Array, jax.Array]:
        """An empty key/value cache: two zero arrays (num_layers, batch, length, num_kv_heads, head_dim).

        ``dtype`` defaults to the model's compute dtype (that of the token embedding).
        """
        c = self.config
        dtype = self.embed_tokens.embedding[...].dtype if dtype is None else dtype
        shape = (c.num_layers, batch, length, c.num_kv_heads, c.head_dim)
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    def cached_hidden_states(self, input_ids: jax.Array, positions: jax.Array, key_mask: jax.Array,
                             cache: tuple[jax.Array, jax.Array], index: jax.Array | int
                             ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Final-normed states (b, s, d) of ``input_ids`` (b, s) placed at cache slots ``index .. index + s − 1``.

        Incremental decoding (prefill with the whole prompt at ``index = 0``, then one token per call).
        ``positions`` (b, s) are each token's RoPE positions (per row, so left-padded rows count from their
        first real token); ``key_mask`` (b, T) marks the cache slots holding real tokens; ``cache`` is
        :meth:`init_cache`'s pair (L, b, T, kv, hd). The query at slot ``q`` sees slot ``t`` iff
        ``t ≤ q`` and ``key_mask[t]`` (and always itself, so a padding query has a key). Returns the
        states and the cache with this call's keys/values written in.
        """
        b, s = input_ids.shape
        cache_k, cache_v = cache
        length = cache_k.shape[2]
        index = jnp.asarray(index, jnp.int32)
        h = self.embed_tokens(input_ids)
        angles = positions.astype(jnp.float32)[..., None] * rope_inverse_frequencies(self.config)
        cos, sin = jnp.cos(angles), jnp.sin(angles)  # (b, s, head_dim/2)
        slots = index + jnp.arange(s, dtype=jnp.int32)
        t = jnp.arange(length, dtype=jnp.int32)
        causal = t[None, :] <= slots[:, None]  # (s, T)
        own = t[None, :] == slots[:, None]
        allowed = (causal[None] & key_mask.astype(bool)[:, None, :]) | own[None]
        bias = mask_to_bias(allowed)[:, None]  # (b, 1, s, T)
        graphdef, stacked = nnx.split(self.layers)

        def step(x: jax.Array, xs: tuple[nnx.State, jax.Array, jax.Array]
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            block_state, ck, cv = xs
            x, ck, cv = nnx.merge(graphdef, block_state).cached(x, cos, sin, bias, ck, cv, index)
            return x, (ck, cv)

        # the cache rides through the layer scan as xs/ys (per-layer slices): carrying the whole stacked
        # cache and updating one layer in place made a SmolLM2 decode step 2.5x slower on CPU (copies)
        h, (cache_k, cache_v) = jax.lax.scan(step, h, (stacked, cache_k, cache_v))
        return self.norm(h), (cache_k, cache_v)
