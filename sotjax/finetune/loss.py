"""SOT Eq. 8: the weighted, length-normalised response NLL, and how a batch is normalised.

For sample ``i`` with prompt ``x_i`` and response ``y_i`` (|y_i| tokens) the paper's loss over the
kept set is

    L = − Σ_{i∈TopK} w'_i · (1/|y_i|) Σ_j log π_θ(y_ij | x_i, y_<j),       Σ_{i∈TopK} w'_i = 1.   (Eq. 8)

Per sample, ``nll_i = (1/|y_i|) Σ_j −log π_θ(y_ij | x_i, y_<j)``: prompt tokens (and padding) are
masked; only response tokens are predicted, and each sample's NLL is the *mean* over its response
tokens (length-normalised), so a long response does not outweigh a short one.

Batch normalisation (chosen and tested here; the paper leaves it open). The run's ``train_weight``
is ``t_i = K · w'_i`` (mean 1 over the K kept rows). A batch ``B`` of ``|B|`` rows costs

    L_B = (1/|B|) Σ_{i∈B} t_i · nll_i .

With batch 1 (the paper's setting) a step on row ``i`` costs ``t_i · nll_i``, and over uniformly
drawn rows ``E[L_B] = (1/K) Σ_i K w'_i nll_i`` = Eq. 8 exactly, for any batch size. Dividing by
the batch's row count (not by ``Σ_B t_i``) keeps the weights meaningful at batch 1 (a self-normalised
``Σ t_i nll_i / Σ t_i`` would cancel the weight of a lone row) and makes gradient accumulation exact:
the trainer sums ``Σ t_i nll_i`` and the row counts over the micro-batches of a step and divides
once, so G micro-batches of size b give the same loss and gradient as one batch of G·b rows
(:func:`weighted_nll_sum` returns the pair). With all ``t_i = 1`` (``--no-weights``) this is plain
SFT with per-sample length normalisation. Padding rows carry ``t_i = 0`` and ``valid_i = 0``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def token_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """−log p(token t | tokens < t) for t = 1..s−1, masked: (b, s−1) float32.

    ``loss_mask`` (b, s) is 1 on the tokens to predict (response tokens), 0 on prompt and padding;
    token ``t`` is predicted from the logits at position ``t − 1``.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = input_ids[:, 1:]
    picked = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    return -picked * loss_mask[:, 1:].astype(jnp.float32)


def response_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sample mean response NLL ``nll_i`` (b,) and response token counts (b,); 0 for an empty response."""
    nll = token_nll(logits, input_ids, loss_mask)
    count = jnp.sum(loss_mask[:, 1:].astype(jnp.float32), axis=1)
    return jnp.sum(nll, axis=1) / jnp.maximum(count, 1.0), count


def weighted_nll_sum(logits: jax.Array, batch: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
    """``(Σ_i t_i · nll_i, Σ_i valid_i)`` over a batch (see the module docstring).

    ``batch`` holds ``input_ids``, ``loss_mask`` (b, s), ``weight`` (b,) = ``t_i`` and ``valid`` (b,)
    (1 for a real row, 0 for a padding row).
    """
    nll, _ = response_nll(logits, batch["input_ids"], batch["loss_mask"])
    w = batch["weight"].astype(jnp.float32) * batch["valid"].astype(jnp.float32)
    return jnp.sum(w * nll), jnp.sum(batch["valid"].astype(jnp.float32))


def eq8_loss(logits: jax.Array, batch: dict[str, Any]) -> jax.Array:
    """``L_B = (1/|B|) Σ_{i∈B} t_i · nll_i`` (|B| = real rows of the batch)."""
    total, rows = weighted_nll_sum(logits, batch)
    return total / jnp.maximum(rows, 1.0)


def model_loss_sum(model: Any, batch: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
    """:func:`weighted_nll_sum` of ``model(input_ids, attention_mask)``."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    return weighted_nll_sum(logits, batch)
