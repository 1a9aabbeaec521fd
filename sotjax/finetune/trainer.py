"""The Stage 2 training loop: AdamW on the LoRA adapters, warm-up + cosine, accumulation, checkpoints, resume.

Optimiser: ``optax.chain(clip_by_global_norm(clip_norm), adamw(schedule, b1=0.9, b2=0.999,
eps=1e-8, weight_decay))`` on the adapter parameters only (the base model is frozen: it is passed
to the jitted step as data and never differentiated). Defaults follow the paper (lr 4e-5, 2
epochs, batch 1) and Hugging Face's Trainer where the paper is silent (weight decay 0, gradient
clipping at norm 1).

Schedule over ``T`` optimiser steps with ``W = ceil(warmup_frac · T)`` warm-up steps (3 %):
``lr(t) = lr · t / W`` for ``t < W``, then ``lr · ½ (1 + cos(π (t − W) / (T − W)))``.

Steps. The micro-batches of all epochs (:func:`sotjax.finetune.data.epoch_batches`) form one
sequence; every ``grad_accum`` consecutive micro-batches make one optimiser step (the last step
may have fewer). A step's gradient is ``∇ Σ t_i nll_i / Σ rows`` over its micro-batches, the exact
gradient of the big batch (:mod:`sotjax.finetune.loss`).

Checkpoints. Every ``checkpoint_every`` steps (and never at the last step: the caller writes the
result) the adapters, the optimiser state, the step (= data position: the order is a pure function
of the seed) and the loss log are written into ``ckpt_dir/checkpoint.npz`` in one atomic rename
(:func:`sotjax.atomic.atomic_path`), with a ``fingerprint`` of everything that determines the run
(inputs, model, settings). :func:`train` with ``resume=True`` reloads it (after checking the
fingerprint and every array's shape) and continues; the result is bit-identical to an
uninterrupted run (tested), because the step is deterministic given its inputs and every input is
restored exactly (float32 arrays saved losslessly).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sotjax.errors import SotjaxInputError, shorten
from sotjax.finetune.data import Encoded, epoch_batches, make_batch
from sotjax.finetune.lora import split_lora
from sotjax.finetune.loss import model_loss_sum

CHECKPOINT = "checkpoint.npz"
CHECKPOINT_FORMAT = "sotjax-finetune-checkpoint/1"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (validated; bad values are one :class:`SotjaxInputError` line naming the flag)."""

    lr: float = 4e-5
    epochs: int = 2
    batch_size: int = 1
    grad_accum: int = 1
    max_len: int = 512
    warmup_frac: float = 0.03
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 200

    def __post_init__(self) -> None:
        def integer(name: str, low: int, high: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
                raise SotjaxInputError(f"--{name.replace('_', '-')} must be an integer in [{low}, {high}], "
                                       f"got {shorten(v)}")

        def number(name: str, low: float, high: float, open_low: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v > high or v < low or (open_low and v == low):
                bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
                raise SotjaxInputError(f"--{name.replace('_', '-')} must be a number in {bound}, got {shorten(v)}")

        number("lr", 0.0, 1.0, open_low=True)
        integer("epochs", 1, 10_000)
        integer("batch_size", 1, 65_536)
        integer("grad_accum", 1, 65_536)
        integer("max_len", 4, 1 << 17)
        number("warmup_frac", 0.0, 1.0)
        number("weight_decay", 0.0, 10.0)
        number("clip_norm", 0.0, 1e6)
        integer("seed", 0, 2**32 - 1)
        integer("checkpoint_every", 1, 10**9)


def schedule(cfg: TrainConfig, total_steps: int) -> Callable[[Any], Any]:
    """Linear warm-up then cosine decay to 0 (see the module docstring)."""
    warm = math.ceil(cfg.warmup_frac * total_steps)
    decay = max(total_steps - warm, 1)

    def lr(step: Any) -> Any:
        t = jnp.asarray(step, jnp.float32)
        up = cfg.lr * t / max(warm, 1)
        down = cfg.lr * 0.5 * (1 + jnp.cos(jnp.pi * jnp.clip((t - warm) / decay, 0.0, 1.0)))
        return jnp.where(t < warm, up, down)

    return lr


def optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(schedule(cfg, total_steps), b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def plan_steps(enc: Encoded, cfg: TrainConfig) -> list[list[np.ndarray]]:
    """The micro-batches (row indices) of every optimiser step, all epochs."""
    micro = [b for e in range(cfg.epochs) for b in epoch_batches(enc.lengths, cfg.batch_size, cfg.seed, e)]
    return [micro[i:i + cfg.grad_accum] for i in range(0, len(micro), cfg.grad_accum)]


@dataclass
class TrainResult:
    steps: int
    total_steps: int
    losses: list[float] = field(default_factory=list)  # per optimiser step: Σ t_i nll_i / rows
    tokens: int = 0  # response tokens seen (this process and the resumed part)
    seconds: float = 0.0
    resumed_from: int | None = None
    checkpoints: int = 0


def _save_checkpoint(ckpt_dir: Path, lora: Any, opt_state: Any, step: int, result: TrainResult,
                     fingerprint: str) -> None:
    import io

    from sotjax.atomic import write_bytes_atomic

    leaves_l = [np.asarray(x) for x in jax.tree.leaves(lora)]
    leaves_o = [np.asarray(x) for x in jax.tree.leaves(opt_state)]
    meta = {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "step": step, "n_lora": len(leaves_l),
            "n_opt": len(leaves_o), "losses": result.losses, "tokens": result.tokens}
    arrays = {f"lora_{i}": a for i, a in enumerate(leaves_l)}
    arrays.update({f"opt_{i}": a for i, a in enumerate(leaves_o)})
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    write_bytes_atomic(ckpt_dir / CHECKPOINT, buf.getvalue())


def read_checkpoint_meta(ckpt_dir: Path) -> dict[str, Any] | None:
    """The metadata of ``ckpt_dir/checkpoint.npz``; None when there is none; one line when it is unreadable."""
    path = ckpt_dir / CHECKPOINT
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
    except Exception as err:
        raise SotjaxInputError(f"{path}: not a readable fine-tune checkpoint ({type(err).__name__}); "
                               "delete it to start over") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise SotjaxInputError(f"{path}: not a sotjax fine-tune checkpoint; delete it to start over")
    return meta


def _load_checkpoint(ckpt_dir: Path, lora: Any, opt_state: Any, fingerprint: str) -> tuple[Any, Any, dict]:
    path = ckpt_dir / CHECKPOINT
    meta = read_checkpoint_meta(ckpt_dir)
    assert meta is not None
    if meta.get("fingerprint") != fingerprint:
        raise SotjaxInputError(f"{path}: written by a fine-tune with other inputs or settings; rerun it with the "
                               "same flags, or delete the checkpoint directory to start over")
    out = []
    with np.load(path, allow_pickle=False) as z:
        for prefix, tree, n in (("lora", lora, meta["n_lora"]), ("opt", opt_state, meta["n_opt"])):
            leaves, treedef = jax.tree.flatten(tree)
            if n != len(leaves):
                raise SotjaxInputError(f"{path}: holds {n} {prefix} arrays, expected {len(leaves)}")
            new = []
            for i, ref in enumerate(leaves):
                a = z[f"{prefix}_{i}"]
                if a.shape != np.shape(ref) or a.dtype != np.asarray(ref).dtype:
                    raise SotjaxInputError(f"{path}: array {prefix}_{i} has {a.dtype}{a.shape}, "
                                           f"expected {np.asarray(ref).dtype}{np.shape(ref)}")
                new.append(jnp.asarray(a))
            out.append(jax.tree.unflatten(treedef, new))
    return out[0], out[1], meta


def train(model: Any, enc: Encoded, cfg: TrainConfig, *, ckpt_dir: Path | None = None, fingerprint: str = "",
          resume: bool = False, progress: bool = False,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train the adapters of ``model`` (in place) on ``enc``; see the module docstring.

    ``on_step(step, loss)`` is called after each optimiser step (after any checkpoint of that step).
    """
    plan = plan_steps(enc, cfg)
    total = len(plan)
    if total == 0:
        raise SotjaxInputError("nothing to train on (no rows)")
    graphdef, lora, frozen = split_lora(model)
    if not jax.tree.leaves(lora):
        raise SotjaxInputError("the model has no LoRA adapters to train")
    tx = optimizer(cfg, total)
    opt_state = tx.init(lora)
    result = TrainResult(steps=0, total_steps=total)
    start = 0
    if resume and ckpt_dir is not None and (ckpt_dir / CHECKPOINT).exists():
        lora, opt_state, meta = _load_checkpoint(ckpt_dir, lora, opt_state, fingerprint)
        start = int(meta["step"])
        result.losses = [float(x) for x in meta["losses"]]
        result.tokens = int(meta["tokens"])
        result.resumed_from = start

    @jax.jit
    def grad_sum(params: Any, frozen_state: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
        def f(p: Any) -> tuple[Any, Any]:
            return model_loss_sum(nnx.merge(graphdef, p, frozen_state), batch)

        (total_nll, rows), grads = jax.value_and_grad(f, has_aux=True)(params)
        return total_nll, rows, grads

    @jax.jit
    def accumulate(acc: Any, grads: Any) -> Any:
        return jax.tree.map(jnp.add, acc, grads)

    @jax.jit
    def apply(params: Any, state: Any, grads: Any, rows: Any) -> tuple[Any, Any]:
        grads = jax.tree.map(lambda g: g / jnp.maximum(rows, 1.0), grads)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    bar = None
    if progress:
        import sys

        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, unit="step", desc="sotjax finetune", file=sys.stderr, leave=False)
    t0 = time.perf_counter()
    seen = 0
    try:
        for step in range(start, total):
            acc = None
            step_nll, step_rows = 0.0, 0.0
            for rows in plan[step]:
                batch = {k: jnp.asarray(v) for k, v in make_batch(enc, rows, cfg.batch_size, cfg.max_len).items()}
                nll, n_rows, grads = grad_sum(lora, frozen, batch)
                acc = grads if acc is None else accumulate(acc, grads)
                step_nll += float(nll)
                step_rows += float(n_rows)
                seen += int(sum(len(enc.tokens[r]) - int(enc.n_prompt[r]) for r in rows))
            lora, opt_state = apply(lora, opt_state, acc, jnp.asarray(step_rows, jnp.float32))
            loss = step_nll / max(step_rows, 1.0)
            if not math.isfinite(loss):
                raise FloatingPointError(f"sotjax finetune: the loss became {loss} at step {step + 1}; "
                                         "try a lower --lr or --dtype float32")
            result.losses.append(loss)
            done = step + 1
            if ckpt_dir is not None and done % cfg.checkpoint_every == 0 and done < total:
                _save_checkpoint(ckpt_dir, lora, opt_state, done, TrainResult(
                    done, total, result.losses, result.tokens + seen), fingerprint)
                result.checkpoints += 1
            if bar is not None:
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"loss {loss:.4f}, {rate:.0f} tok/s")
                bar.update(1)
            if on_step is not None:
                on_step(done, loss)
    finally:
        if bar is not None:
            bar.close()
    nnx.update(model, lora)
    result.steps = total
    result.tokens += seen
    result.seconds = time.perf_counter() - t0
    return result


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)
