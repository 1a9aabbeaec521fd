"""`sotjax weigh`: learn SOT weights for a corpus and select the Top-K.

Precedence of settings: built-in defaults < ``--config cfg.yaml`` < flags given on the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "learn push-pull OT weights for a corpus (safe anchor vs harmful reference) and select the Top-K"


def add_text_arguments(t: argparse._ArgumentGroup) -> None:
    """The feature options of text inputs, shared by every command that reads text like weigh does."""
    t.add_argument("--model", default="smollm2", help="smollm2 (default) | minilm | path to .gguf / HF dir")
    t.add_argument("--template", default="human_assistant", help="human_assistant (default) | chat")
    t.add_argument("--max-length", type=int, default=256, help="tokens per text (default 256)")
    t.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    t.add_argument("--layer", type=int, default=-1, help="hidden-state layer, HF indexing (default -1: the last)")
    t.add_argument("--pooling", choices=("auto", "last", "mean"), default="auto",
                   help="token states -> one vector: last token or mean (default auto: last for decoders, the "
                        "paper's feature; mean for encoders)")
    t.add_argument("--cache-dir", type=Path, default=None, help="embedding cache directory (default: none)")
    t.add_argument("--prompt-field", default="prompt")
    t.add_argument("--response-field", default="response")
    t.add_argument("--text-field", default="text")
    t.add_argument("--id-field", default="id")


def add_arguments(p: argparse.ArgumentParser) -> None:
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--corpus", required=True, type=Path, help="corpus embeddings (.npy, .jsonl, .parquet)")
    io.add_argument("--safe", type=Path, help="safe-anchor embeddings (required unless --lam 1)")
    io.add_argument("--harmful", type=Path, help="harmful-reference embeddings (required unless --lam 0)")
    io.add_argument("--ids", type=Path, help="ids of the corpus rows for a .npy corpus (.npy or one id per line)")
    io.add_argument("--out", required=True, type=Path, help="output run directory (written atomically)")
    io.add_argument("--config", type=Path, help="YAML file with SOTConfig fields; flags override it")

    add_text_arguments(p.add_argument_group("text inputs (files with prompt/response or text fields and no embedding)"))
    io.add_argument("--no-progress", action="store_true", help="no progress bar")

    io.add_argument("--dedup", type=float, default=None, metavar="THRESHOLD",
                    help="fit each within-corpus near-copy cluster (cosine >= THRESHOLD, e.g. 0.95) as one sample and "
                         "spread its weight over the copies; warns on anchor leakage (see `sotjax audit`)")
    h = p.add_argument_group("weight head (score unseen data later with `sotjax score`)")
    h.add_argument("--head", choices=("linear", "mlp"), default=None,
                   help="learn the logits as a head on the features, w = softmax(g(z) + r), and write it into the "
                        "run (head.safetensors, head.json); default: free per-sample logits")
    h.add_argument("--head-residual", type=float, default=0.0, metavar="LAMBDA_R",
                   help="per-sample residual logits r with the penalty LAMBDA_R/2 * mean(r^2) (default 0: none)")
    h.add_argument("--head-decay", type=float, default=0.0, metavar="LAMBDA_PSI",
                   help="ridge penalty LAMBDA_PSI/2 * sum ||W||^2 / s on the head's weight matrices, s = the "
                        "layer's gradient scale (d for the unit rows): each step shrinks W by lr*LAMBDA_PSI "
                        "(default 0: none)")
    h.add_argument("--head-hidden", type=int, default=64, metavar="H", help="hidden units of the mlp head (default 64)")

    add_distributed_flags(p)
    add_config_flags(p)


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
    """``--coordinator``, ``--num-processes``, ``--process-id`` (:class:`sotjax.distributed.DistributedConfig`)."""
    from sotjax import distributed as D

    g = p.add_argument_group(
        "several processes or hosts (jax.distributed)",
        "Start one process per host with the same command, --coordinator and --num-processes, and its own "
        f"--process-id (all three flags together, or ${D.ENV_COORDINATOR}, ${D.ENV_NUM_PROCESSES}, "
        f"${D.ENV_PROCESS_ID}). Each process reads only its own rows of a .npy corpus (memory-mapped); "
        ".jsonl/.parquet embedding files are read whole by every process, and text inputs are refused (embed "
        "them first with `sotjax embed`). Process 0 writes --out; the others print one line, or an error.")
    g.add_argument(D.FLAG_COORDINATOR, metavar="HOST:PORT", default=None,
                   help=f"address of process 0, where JAX's coordination service listens (or ${D.ENV_COORDINATOR}; "
                        f"${D.JAX_ENV_COORDINATOR} when a process count is set)")
    g.add_argument(D.FLAG_NUM_PROCESSES, metavar="N", type=int, default=None,
                   help=f"number of processes in the run (or ${D.ENV_NUM_PROCESSES}; default 1)")
    g.add_argument(D.FLAG_PROCESS_ID, metavar="I", type=int, default=None,
                   help=f"this process's index in [0, N); process 0 writes --out (or ${D.ENV_PROCESS_ID})")


_GROUP_TITLES = {"geometry": "geometry and memory", "objective": "objective (defaults: the paper's, see README)",
                 "solver": "optimiser and inner solvers", "selection": "selection"}


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field, grouped by layer, generated from the dataclasses.

    Flags default to None so that only the ones given override ``--config`` (defaults in the help).
    """
    import dataclasses
    import typing

    from sotjax import config as C

    defaults = C.SOTConfig()
    for layer_name, layer in C.LAYERS.items():
        group = p.add_argument_group(_GROUP_TITLES[layer_name])
        keep_group = group.add_mutually_exclusive_group() if layer_name == "selection" else None
        hints = typing.get_type_hints(layer)
        for field in dataclasses.fields(layer):
            flag = "--" + field.name.replace("_", "-")
            default = getattr(defaults, field.name)
            help_text = C.FIELD_HELP[field.name] + ("" if default is None else f" (default {default})")
            target = keep_group if field.name in ("keep", "keep_count") and keep_group is not None else group
            hint = hints[field.name]
            choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
            if hint is bool:
                target.add_argument(flag, action="store_const", const=True, help=help_text)
            elif field.name == "memory_budget":
                target.add_argument(flag, type=str, metavar="SIZE", help=help_text)
            elif field.name == "conditioning":
                target.add_argument(flag, type=str, metavar="SPEC", help=help_text)
            elif choices:
                target.add_argument(flag, choices=choices, help=help_text)
            else:
                number = int if int in typing.get_args(hint) or hint is int else float
                target.add_argument(flag, type=number, help=help_text)


def load_config(args: argparse.Namespace):
    """Defaults < YAML < explicit flags; every value validated by SOTConfig."""
    import dataclasses

    from sotjax.config import SOTConfig
    from sotjax.errors import SotjaxInputError
    from sotjax.io import read_config_file

    values: dict = {}
    if args.config is not None:
        values.update(read_config_file(args.config))
        source = str(args.config)
    else:
        source = "config"
    from sotjax.plan import parse_bytes

    if isinstance(values.get("memory_budget"), str):
        values["memory_budget"] = parse_bytes(values["memory_budget"], f"{source}: memory_budget")
    for field in dataclasses.fields(SOTConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = parse_bytes(value) if field.name == "memory_budget" else value
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
                                 batch_size=args.batch_size, layer=args.layer, pooling=args.pooling,
                                 cache_dir=args.cache_dir)
    except ValueError as err:
        raise SotjaxInputError(str(err)) from None
    return TextInputOptions(features, args.prompt_field, args.response_field, args.id_field, args.text_field)


def run(args: argparse.Namespace) -> int:
    from sotjax import distributed, pipeline
    from sotjax.runtime import enable_compilation_cache

    # before anything that starts a JAX backend (JAX refuses to join a run afterwards)
    cluster = distributed.DistributedConfig.resolve(args.coordinator, args.num_processes, args.process_id)
    distributed.initialize(cluster)
    enable_compilation_cache()

    if cluster.is_multi_process:
        # a bad config on one host only must stop every process, not leave the others waiting
        with distributed.stop_together():
            config, text = load_config(args), text_options(args)
    else:
        config, text = load_config(args), text_options(args)
    head = None
    if args.head is not None:
        from sotjax.head import HeadConfig

        head = HeadConfig(args.head, hidden=args.head_hidden, residual=args.head_residual, decay=args.head_decay)
    summary = pipeline.weigh_files(
        corpus=args.corpus, safe=args.safe, harmful=args.harmful, out=args.out,
        config=config, ids=args.ids, progress=not args.no_progress, argv=sys.argv,
        text=text, head=head, dedup=args.dedup,
    )
    print(summary)
    return 0
