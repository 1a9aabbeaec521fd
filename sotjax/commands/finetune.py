"""``sotjax finetune``: SOT Stage 2 — weighted LoRA fine-tuning on a run's Top-K (Eq. 8).

Reads a weigh/demo run (``--run``), joins its ``selected``/``train_weight`` with the corpus texts
(``--data``) by id, adds LoRA adapters to the model (``--model``) and trains them with AdamW
(warm-up + cosine) on the weighted, length-normalised response NLL. Writes ``--out`` atomically
(:mod:`sotjax.finetune.outdir`): ``adapter/`` (PEFT), ``merged/`` (a transformers checkpoint),
``config.json``, ``stats.json``. Checkpoints go to a hidden sibling ``.<out>.finetune-ckpt/``;
``--resume`` continues an interrupted run bit-identically. Every input is checked before any work;
bad input is one line and exit 2 with nothing written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "SOT Stage 2: weighted LoRA fine-tuning on a run's Top-K (adapter + merged checkpoint)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--run", required=True, type=Path, help="a run directory (sotjax weigh or demo)")
    io.add_argument("--data", required=True, type=Path, help="the corpus the run weighed (prompt/response texts)")
    io.add_argument("--model", required=True, help="smollm2 | path to a .gguf file | HF checkpoint directory")
    io.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    io.add_argument("--prompt-field", default="prompt")
    io.add_argument("--response-field", default="response")
    io.add_argument("--id-field", default="id")
    io.add_argument("--template", default=None, choices=("chat", "human_assistant"),
                    help="how pairs are rendered (default: the model's chat template when it has one)")
    io.add_argument("--no-merged", action="store_true", help="write the adapter only (no merged checkpoint)")
    io.add_argument("--no-progress", action="store_true", help="no progress bar")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora-rank", type=int, default=16, help="rank r (default 16)")
    lo.add_argument("--lora-alpha", type=float, default=16.0, help="alpha (default 16; scale alpha/r)")
    lo.add_argument("--targets", default="q_proj,v_proj", help="projections to adapt (default q_proj,v_proj)")
    tr = p.add_argument_group("training")
    tr.add_argument("--lr", type=float, default=4e-5, help="peak learning rate (default 4e-5)")
    tr.add_argument("--epochs", type=int, default=2, help="epochs (default 2)")
    tr.add_argument("--batch-size", type=int, default=1, help="rows per micro-batch (default 1)")
    tr.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimiser step (default 1)")
    tr.add_argument("--max-len", type=int, default=512, help="tokens per row, prompt + response (default 512)")
    tr.add_argument("--warmup", type=float, default=0.03, help="warm-up fraction of the steps (default 0.03)")
    tr.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    tr.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="compute dtype of the base model (default bfloat16; adapters stay float32)")
    tr.add_argument("--seed", type=int, default=0, help="data order and adapter init (default 0)")
    tr.add_argument("--checkpoint-every", type=int, default=200, help="optimiser steps between checkpoints")
    tr.add_argument("--resume", action="store_true", help="continue from the checkpoint of an interrupted run")
    ab = p.add_argument_group("ablations")
    ab.add_argument("--no-weights", action="store_true", help="plain SFT on the kept rows (Top-K only)")
    ab.add_argument("--all-rows", action="store_true", help="train on every row (no Top-K)")


def _fingerprint(parts: dict[str, Any]) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def run(args: argparse.Namespace) -> int:
    import shutil
    import sys

    from sotjax.errors import SotjaxInputError
    from sotjax.finetune.lora import LoRAConfig, parse_targets
    from sotjax.finetune.outdir import check_finetune_out, checkpoint_dir
    from sotjax.finetune.trainer import TrainConfig

    lora_cfg = LoRAConfig(rank=args.lora_rank, alpha=args.lora_alpha, targets=parse_targets(args.targets))
    train_cfg = TrainConfig(lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
                            max_len=args.max_len, warmup_frac=args.warmup, weight_decay=args.weight_decay,
                            seed=args.seed, checkpoint_every=args.checkpoint_every)
    from sotjax.models.registry import resolve_model_path

    model_path = resolve_model_path(args.model)
    inputs = [args.run, args.data, model_path]
    check_finetune_out(args.out, inputs)
    ckpt = checkpoint_dir(args.out)
    if ckpt.exists() or ckpt.is_symlink():
        if ckpt.is_symlink() or not ckpt.is_dir():
            raise SotjaxInputError(f"{ckpt}: exists and is not a checkpoint directory; remove it")
        if not args.resume and any(ckpt.iterdir()):
            raise SotjaxInputError(f"{ckpt}: holds the checkpoint of an interrupted fine-tune; pass --resume (with "
                                   "the same flags) to continue it, or delete it to start over")

    from sotjax.io import file_sha256
    from sotjax.rundir import WEIGHTS, read_run

    run_dir = read_run(args.run)
    from sotjax.finetune.data import encode_rows, training_rows

    rows = training_rows(run_dir, args.data, use_weights=not args.no_weights, all_rows=args.all_rows,
                         prompt_field=args.prompt_field, response_field=args.response_field,
                         id_field=args.id_field)
    from sotjax.finetune.causal_lm import load_causal_lm

    loaded = load_causal_lm(model_path, args.dtype)
    from sotjax.finetune.lora import apply_lora

    apply_lora(loaded.model, lora_cfg, seed=args.seed)
    template = args.template or ("chat" if loaded.tokenizer.chat_template else "human_assistant")
    enc = encode_rows(loaded.tokenizer, rows, train_cfg.max_len, template)

    data_sha = file_sha256(args.data) if Path(args.data).is_file() else None
    settings = {"lora": {"r": lora_cfg.rank, "alpha": lora_cfg.alpha, "targets": list(lora_cfg.targets)},
                "train": _asdict(train_cfg), "dtype": args.dtype, "template": template, "mode": rows.mode,
                "fields": [args.prompt_field, args.response_field, args.id_field]}
    inputs_info: dict[str, dict[str, Any]] = {
        "run": {"path": str(args.run), "weights_sha256": file_sha256(Path(args.run) / WEIGHTS)},
        "data": {"path": str(args.data), "sha256": data_sha},
        "model": {"name": str(args.model), "path": str(loaded.path), "fingerprint": loaded.fingerprint}}
    stable_inputs = {"run": inputs_info["run"]["weights_sha256"], "data": data_sha, "model": loaded.fingerprint}
    fingerprint = _fingerprint({"settings": settings, "inputs": stable_inputs})

    from sotjax.finetune.trainer import train

    resume_possible = args.resume and (ckpt / "checkpoint.npz").exists()
    if args.resume and not resume_possible:
        print(f"sotjax finetune: no checkpoint at {ckpt}; starting from step 0", file=sys.stderr)
    ckpt.mkdir(parents=True, exist_ok=True)
    result = train(loaded.model, enc, train_cfg, ckpt_dir=ckpt, fingerprint=fingerprint, resume=args.resume,
                   progress=not args.no_progress)

    from sotjax.finetune.export import write_adapter, write_merged
    from sotjax.finetune.outdir import writing_finetune
    from sotjax.io import dumps_json

    config = {"command": ["sotjax", "finetune", *sys.argv[2:]], "settings": settings, "inputs": inputs_info,
              "fingerprint": fingerprint, "versions": _versions()}
    stats = {"rows": len(rows.ids), "mode": rows.mode, "truncated_rows": enc.n_truncated,
             "response_tokens_per_epoch": enc.n_response_tokens, "steps": result.steps,
             "losses": result.losses, "tokens": result.tokens, "seconds": result.seconds,
             "resumed_from": result.resumed_from, "checkpoints_written": result.checkpoints,
             "weight_mean": float(rows.weights.mean()), "weight_max": float(rows.weights.max())}
    with writing_finetune(args.out, inputs) as staging:
        write_adapter(loaded.model, lora_cfg, staging / "adapter", base_model=str(loaded.path))
        if not args.no_merged:
            write_merged(loaded.model, staging / "merged", base_config=loaded.hf_config, dtype=args.dtype,
                         tokenizer=loaded.tokenizer, tokenizer_source=loaded.path)
        (staging / "config.json").write_text(dumps_json(config), encoding="utf-8")
        (staging / "stats.json").write_text(dumps_json(stats), encoding="utf-8")
    if ckpt.is_dir() and all(p.name == "checkpoint.npz" or p.name.startswith(".checkpoint.npz.")
                             for p in ckpt.iterdir()):
        shutil.rmtree(ckpt, ignore_errors=True)
    first, last = (result.losses[0], result.losses[-1]) if result.losses else (float("nan"), float("nan"))
    print(f"sotjax finetune: {len(rows.ids)} rows ({rows.mode}), {result.steps} steps, loss {first:.4f} -> "
          f"{last:.4f}, {result.tokens} response tokens in {result.seconds:.1f} s; wrote {args.out}")
    return 0


def _asdict(cfg: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(cfg)


def _versions() -> dict[str, str]:
    import contextlib
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("sotjax", "jax", "flax", "optax"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out
