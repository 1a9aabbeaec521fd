"""Configuration of text feature extraction (validated at construction)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from sotjax.errors import shorten

TEMPLATES = ("human_assistant", "chat")
COMPUTE_DTYPES = ("float32", "bfloat16")
TRUNCATION_SIDES = ("right", "left")
POOLINGS = ("auto", "last", "mean")
#: what ``pooling="auto"`` means for each model kind (the paper's feature for decoders)
DEFAULT_POOLING = {"decoder": "last", "encoder": "mean"}


def resolve_pooling(pooling: str, kind: str) -> str:
    """``"auto"`` -> the model kind's own pooling (:data:`DEFAULT_POOLING`); anything else as it is."""
    return DEFAULT_POOLING[kind] if pooling == "auto" else pooling


@dataclass(frozen=True)
class FeatureConfig:
    """How texts become vectors.

    model: ``"smollm2"`` (default; SmolLM2-135M-Instruct, last-token state, d = 576), ``"minilm"``
        (all-MiniLM-L6-v2, mean-pooled and L2-normalised, d = 384), a ``.gguf`` file or a Hugging Face
        checkpoint directory.
    template: ``"human_assistant"`` renders ``"Human: {prompt}\\nAssistant: {response}"`` (the paper's
        literal form, default); ``"chat"`` renders a user/assistant exchange with the model's chat
        template. Ignored when no responses are given (texts are used as they are).
    max_length: tokens kept per text, special tokens included; longer texts are truncated on
        ``truncation_side`` (``"right"`` keeps the beginning) and counted in the report.
    batch_size: texts per forward pass (rounded up to a multiple of the local device count).
    dtype: *compute* dtype of weights and activations, ``"float32"`` or ``"bfloat16"``; the returned
        features are always float32.
    layer: hidden-state index as in Hugging Face ``output_hidden_states``: ``-1`` = last layer after the
        final norm (decoder) / last layer (encoder), ``0`` = token embeddings, ``i`` = output of block i.
    pooling: how the token states ``H_t`` (t = 1..len) of one text become its vector: ``"last"`` =
        ``H_len`` (the last real token, SOT's feature), ``"mean"`` = ``Σ_t H_t / len`` (for encoders
        also L2-normalised, as sentence-transformers does), ``"auto"`` (default) = last for decoders,
        mean for encoders (the paper's and the encoder's own choice).
    cache_dir: directory of the on-disk embedding cache, or ``None`` for no cache.

    Invalid values raise :class:`ValueError` naming the field (booleans are not accepted as ints).
    """

    model: str = "smollm2"
    template: str = "human_assistant"
    max_length: int = 256
    batch_size: int = 32
    dtype: str = "float32"
    layer: int = -1
    pooling: str = "auto"
    cache_dir: str | os.PathLike | None = None
    truncation_side: str = "right"

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, os.PathLike)) or not str(self.model):
            raise ValueError(f"FeatureConfig.model must be a name or a path, got {shorten(self.model)}")
        if self.template not in TEMPLATES:
            raise ValueError(f"FeatureConfig.template must be one of {TEMPLATES}, got {shorten(self.template)}")
        if not _is_int(self.max_length) or not 2 <= self.max_length <= 32768:
            raise ValueError(f"FeatureConfig.max_length must be an int in [2, 32768], got {shorten(self.max_length)}")
        if not _is_int(self.batch_size) or not 1 <= self.batch_size <= 65536:
            raise ValueError(f"FeatureConfig.batch_size must be an int in [1, 65536], got {shorten(self.batch_size)}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"FeatureConfig.dtype (compute dtype) must be one of {COMPUTE_DTYPES}, got {shorten(self.dtype)}; "
                "store float16 outputs by casting the returned array"
            )
        if not _is_int(self.layer):
            raise ValueError(f"FeatureConfig.layer must be an int, got {shorten(self.layer)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"FeatureConfig.pooling must be one of {POOLINGS}, got {shorten(self.pooling)}")
        cache_ok = isinstance(self.cache_dir, (str, os.PathLike)) and bool(str(self.cache_dir))
        if self.cache_dir is not None and not cache_ok:
            raise ValueError(f"FeatureConfig.cache_dir must be a directory path or None, got {shorten(self.cache_dir)}")
        if self.truncation_side not in TRUNCATION_SIDES:
            raise ValueError(
                f"FeatureConfig.truncation_side must be one of {TRUNCATION_SIDES}, got {shorten(self.truncation_side)}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
