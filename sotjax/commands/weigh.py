"""`sotjax weigh`: learn SOT weights for a corpus and select the Top-K.

Precedence of settings: built-in defaults < ``--config cfg.yaml`` < flags given on the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "learn push-pull OT weights for a corpus (safe anchor vs harmful reference) and select the Top-K"

# flag dest -> SOTConfig field (flags default to None so that only explicit ones override)
_FLAG_FIELDS = {
    "lam": "lam", "epsilon": "epsilon", "loss": "loss", "steps": "steps", "lr": "lr",
    "optimizer": "optimizer", "momentum": "momentum", "entropy": "entropy", "keep": "keep",
    "keep_count": "keep_count", "reweight": "reweight", "dtype": "dtype",
    "sinkhorn_threshold": "sinkhorn_threshold", "relative_epsilon": "relative_epsilon", "lse_mode": "lse_mode",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sotjax.config import DTYPES, LOSSES, LSE_MODES, OPTIMIZERS, REWEIGHTS

    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--corpus", required=True, type=Path, help="corpus embeddings (.npy, .jsonl, .parquet)")
    io.add_argument("--safe", type=Path, help="safe-anchor embeddings (required unless --lam 1)")
    io.add_argument("--harmful", type=Path, help="harmful-reference embeddings (required unless --lam 0)")
    io.add_argument("--ids", type=Path, help="ids of the corpus rows for a .npy corpus (.npy or one id per line)")
    io.add_argument("--out", required=True, type=Path, help="output run directory (written atomically)")
    io.add_argument("--config", type=Path, help="YAML file with SOTConfig fields; flags override it")

    t = p.add_argument_group("text inputs (files with prompt/response or text fields and no embedding)")
    t.add_argument("--model", default="smollm2", help="smollm2 (default) | minilm | path to .gguf / HF dir")
    t.add_argument("--template", default="human_assistant", help="human_assistant (default) | chat")
    t.add_argument("--max-length", type=int, default=256, help="tokens per text (default 256)")
    t.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    t.add_argument("--cache-dir", type=Path, default=None, help="embedding cache directory (default: none)")
    t.add_argument("--prompt-field", default="prompt")
    t.add_argument("--response-field", default="response")
    t.add_argument("--text-field", default="text")
    t.add_argument("--id-field", default="id")
    io.add_argument("--no-progress", action="store_true", help="no progress bar")

    m = p.add_argument_group("method (defaults: the paper's, see README)")
    m.add_argument("--lam", type=float, help="push weight lambda in [0, 1] (default 0.5)")
    m.add_argument("--epsilon", type=float, help="entropic regularisation (default 0.1, cost units)")
    m.add_argument("--relative-epsilon", action="store_const", const=True, help="scale epsilon by the mean cost")
    m.add_argument("--loss", choices=LOSSES, help="transport (paper Eq. 6, default) | regularized | divergence")
    m.add_argument("--entropy", type=float, help="KL-to-uniform weight tau on w (default 0)")
    m.add_argument("--optimizer", choices=OPTIMIZERS, help="optimiser of the logits (default sgd)")
    m.add_argument("--lr", type=float, help="learning rate (default 1.0; size-independent, see README)")
    m.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    m.add_argument("--steps", type=int, help="maximum optimiser steps (default 50)")
    m.add_argument("--sinkhorn-threshold", type=float, help="Sinkhorn marginal error threshold (default 1e-4)")
    m.add_argument("--dtype", choices=DTYPES, help="float32 (default) or float64")
    m.add_argument("--lse-mode", choices=LSE_MODES, help="Sinkhorn updates: auto (default) | log | kernel")

    s = p.add_argument_group("selection")
    keep = s.add_mutually_exclusive_group()
    keep.add_argument("--keep", type=float, help="fraction of the corpus kept by Top-K (default 0.8)")
    keep.add_argument("--keep-count", type=int, help="number of samples kept by Top-K")
    s.add_argument("--reweight", choices=REWEIGHTS, help="training-weight reading of Eq. 7 (default exp)")


def load_config(args: argparse.Namespace):
    """Defaults < YAML < explicit flags; every value validated by SOTConfig."""
    from sotjax.config import SOTConfig
    from sotjax.errors import SotjaxInputError
    from sotjax.io import read_config_file

    values: dict = {}
    if args.config is not None:
        values.update(read_config_file(args.config))
        source = str(args.config)
    else:
        source = "config"
    for dest, field in _FLAG_FIELDS.items():
        value = getattr(args, dest, None)
        if value is not None:
            values[field] = value
    if values.get("keep_count") is not None and getattr(args, "keep", None) is None:
        values.pop("keep", None)
    try:
        return SOTConfig.from_dict(values, source=source)
    except TypeError as err:
        raise SotjaxInputError(f"{source}: {err}") from None


def text_options(args: argparse.Namespace):
    from sotjax.errors import SotjaxInputError
    from sotjax.features import FeatureConfig
    from sotjax.pipeline import TextInputOptions

    try:
        features = FeatureConfig(model=args.model, template=args.template, max_length=args.max_length,
                                 batch_size=args.batch_size, cache_dir=args.cache_dir)
    except ValueError as err:
        raise SotjaxInputError(str(err)) from None
    return TextInputOptions(features, args.prompt_field, args.response_field, args.id_field, args.text_field)


def run(args: argparse.Namespace) -> int:
    from sotjax import pipeline

    config = load_config(args)
    summary = pipeline.weigh_files(
        corpus=args.corpus, safe=args.safe, harmful=args.harmful, out=args.out,
        config=config, ids=args.ids, progress=not args.no_progress, argv=sys.argv,
        text=text_options(args),
    )
    print(summary)
    return 0
