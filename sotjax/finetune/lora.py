"""LoRA adapters for the flax.nnx Llama: ``y = W x + (α/r) · B A x`` on the named projections.

For a target linear map ``W`` (nnx kernel (in, out), i.e. ``y = x W``) LoRA adds two trainable
matrices ``A`` (in, r) and ``B`` (r, out):

    y = x W + b + (α / r) · (x A) B

``A`` is drawn like PEFT's default (Kaiming-uniform with a = √5: U(−1/√in, 1/√in)) and ``B`` is
zero, so an adapted model computes exactly what the base model computes until ``B`` is trained.
Dropout is 0 (the paper's setting; other values are refused). The base weights are frozen: the
adapters are :class:`flax.nnx.LoRAParam` variables, so ``nnx.split(model, nnx.LoRAParam, ...)``
separates the trainable state from everything else (:func:`split_lora`). Adapter parameters are
kept in float32 (master weights) and cast to the activations' dtype in the forward pass.

The decoder stores its blocks stacked (leading layer axis); adapters are stacked the same way,
``A`` (L, in, r) and ``B`` (L, r, out), and ride through the layer scan with the base weights.

Targets are projection names: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (attention) and
``gate_proj``, ``up_proj``, ``down_proj`` (MLP); default ``q_proj,v_proj`` (the paper's).
:func:`merge_lora` folds ``(α/r) A B`` into ``W`` and returns a plain model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sotjax.errors import SotjaxInputError, shorten

#: projection name -> (sub-module of a decoder block, attribute)
TARGETS: dict[str, tuple[str, str]] = {
    "q_proj": ("self_attn", "q_proj"),
    "k_proj": ("self_attn", "k_proj"),
    "v_proj": ("self_attn", "v_proj"),
    "o_proj": ("self_attn", "o_proj"),
    "gate_proj": ("mlp", "gate_proj"),
    "up_proj": ("mlp", "up_proj"),
    "down_proj": ("mlp", "down_proj"),
}
DEFAULT_TARGETS = ("q_proj", "v_proj")
MAX_RANK = 4096


@dataclass(frozen=True)
class LoRAConfig:
    """Rank ``r`` > 0, scale numerator ``alpha`` > 0, ``targets`` (projection names), ``dropout`` (0 only)."""

    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= MAX_RANK:
            raise SotjaxInputError(f"--lora-rank must be an integer in [1, {MAX_RANK}], got {shorten(self.rank)}")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha)
                or self.alpha <= 0):
            raise SotjaxInputError(f"--lora-alpha must be a positive number, got {shorten(self.alpha)}")
        targets = tuple(self.targets) if not isinstance(self.targets, str) else parse_targets(self.targets)
        if not targets:
            raise SotjaxInputError("--targets names no module (e.g. q_proj,v_proj)")
        for t in targets:
            if t not in TARGETS:
                raise SotjaxInputError(f"--targets: unknown target module {shorten(t)} "
                                       f"(choose from {', '.join(TARGETS)})")
        if len(set(targets)) != len(targets):
            raise SotjaxInputError(f"--targets names a module twice: {','.join(targets)}")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "alpha", float(self.alpha))
        if self.dropout != 0:
            raise SotjaxInputError(f"LoRA dropout must be 0 (the paper's setting), got {shorten(self.dropout)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def parse_targets(text: str) -> tuple[str, ...]:
    """``"q_proj, v_proj"`` -> ``("q_proj", "v_proj")``."""
    return tuple(t.strip() for t in str(text).split(",") if t.strip())


class LoRALinear(nnx.Module):
    """A frozen :class:`nnx.Linear` plus ``(α/r) (x A) B`` (see the module docstring)."""

    def __init__(self, base: nnx.Linear, lora_a: Any, lora_b: Any, scale: float):
        self.base = base
        self.lora_a = nnx.LoRAParam(jnp.asarray(lora_a, jnp.float32))
        self.lora_b = nnx.LoRAParam(jnp.asarray(lora_b, jnp.float32))
        self.scale = float(scale)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        a = self.lora_a[...].astype(x.dtype)
        b = self.lora_b[...].astype(x.dtype)
        delta = jnp.matmul(jnp.matmul(x, a), b, preferred_element_type=jnp.float32) * self.scale
        return (y.astype(jnp.float32) + delta).astype(y.dtype)


def _blocks(model: Any) -> Any:
    """The stacked decoder blocks of a :class:`CausalLM` / :class:`LlamaModel`, or a one-line error."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "config"):
        raise SotjaxInputError(f"LoRA: {type(model).__name__} is not a Llama-family decoder (no stacked layers)")
    return inner, layers


def _projection(layers: Any, name: str, model: Any) -> tuple[Any, str, Any]:
    group, attr = TARGETS[name]
    parent = getattr(layers, group, None)
    module = getattr(parent, attr, None) if parent is not None else None
    if module is None:
        raise SotjaxInputError(f"LoRA: the model ({type(model).__name__}) has no projection '{name}' "
                               f"(expected {group}.{attr} in every decoder block)")
    return parent, attr, module


def apply_lora(model: Any, config: LoRAConfig, seed: int = 0) -> Any:
    """Wrap the target projections of ``model`` (in place) in :class:`LoRALinear`; returns ``model``.

    ``A`` comes from ``seed`` (numpy, per target in order), ``B`` is zero. Raises
    :class:`SotjaxInputError` for a model without stacked Llama blocks or without a named
    projection, and for a model that already carries adapters.
    """
    inner, layers = _blocks(model)
    n_layers = inner.config.num_layers
    rng = np.random.default_rng(seed)
    for name in config.targets:
        parent, attr, module = _projection(layers, name, model)
        if isinstance(module, LoRALinear):
            raise SotjaxInputError(f"LoRA: projection '{name}' already has an adapter")
        if not isinstance(module, nnx.Linear):
            raise SotjaxInputError(f"LoRA: projection '{name}' is a {type(module).__name__}, not a linear layer")
        kernel = module.kernel[...]
        if kernel.ndim != 3 or kernel.shape[0] != n_layers:
            raise SotjaxInputError(f"LoRA: projection '{name}' kernel has shape {kernel.shape}, "
                                   f"expected ({n_layers}, in, out)")
        _, d_in, d_out = kernel.shape
        bound = 1.0 / math.sqrt(d_in)
        a = rng.uniform(-bound, bound, size=(n_layers, d_in, config.rank)).astype(np.float32)
        b = np.zeros((n_layers, config.rank, d_out), np.float32)
        setattr(parent, attr, LoRALinear(module, a, b, config.scale))
    return model


def lora_modules(model: Any) -> dict[str, LoRALinear]:
    """Projection name -> its :class:`LoRALinear` (stacked over layers), in :data:`TARGETS` order."""
    _, layers = _blocks(model)
    out = {}
    for name, (group, attr) in TARGETS.items():
        module = getattr(getattr(layers, group, None), attr, None)
        if isinstance(module, LoRALinear):
            out[name] = module
    return out


def split_lora(model: Any) -> tuple[Any, nnx.State, nnx.State]:
    """``graphdef, lora_state, frozen_state`` (merge back with ``nnx.merge(graphdef, lora, frozen)``)."""
    graphdef, *states = nnx.split(model, nnx.LoRAParam, ...)
    lora, frozen = states
    return graphdef, lora, frozen


def lora_arrays(model: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Projection name -> (A (L, in, r), B (L, r, out)) as float32 numpy arrays."""
    return {name: (np.asarray(m.lora_a[...], np.float32), np.asarray(m.lora_b[...], np.float32))
            for name, m in lora_modules(model).items()}


def set_lora_arrays(model: Any, arrays: dict[str, tuple[Any, Any]]) -> None:
    """Load adapter values into a model that has adapters on exactly the same projections."""
    modules = lora_modules(model)
    if set(modules) != set(arrays):
        raise SotjaxInputError(f"adapter holds {sorted(arrays)}, the model adapts {sorted(modules)}")
    for name, (a, b) in arrays.items():
        m = modules[name]
        for var, value, what in ((m.lora_a, a, "lora_A"), (m.lora_b, b, "lora_B")):
            value = np.asarray(value, np.float32)
            if value.shape != var[...].shape:
                raise SotjaxInputError(f"adapter {name}.{what} has shape {value.shape}, expected {var[...].shape}")
            var[...] = jnp.asarray(value)


def merge_lora(model: Any) -> Any:
    """A copy of ``model`` with ``W ← W + (α/r) A B`` on every adapted projection and no adapters left.

    The merge is computed in float32 and cast to the base kernel's dtype.
    """
    merged = nnx.clone(model)
    _, layers = _blocks(merged)
    for name in list(lora_modules(merged)):
        group, attr = TARGETS[name]
        parent = getattr(layers, group)
        module: LoRALinear = getattr(parent, attr)
        base = module.base
        kernel = base.kernel[...]
        delta = jnp.einsum("lir,lro->lio", module.lora_a[...], module.lora_b[...]) * module.scale
        base.kernel[...] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        setattr(parent, attr, base)
    return merged


def count_params(state: nnx.State | Iterable[Any]) -> int:
    """Number of scalars in a state (or a pytree)."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state)))


def describe(config: LoRAConfig, targets: Sequence[str] | None = None) -> dict[str, Any]:
    """The adapter settings as a JSON-able dict."""
    return {"r": config.rank, "lora_alpha": config.alpha, "target_modules": list(targets or config.targets),
            "lora_dropout": config.dropout}
