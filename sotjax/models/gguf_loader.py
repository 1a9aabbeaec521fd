"""Load a Llama-family decoder from a GGUF file (llama.cpp's format), without torch or pickle.

The file is parsed with the ``gguf`` package's reader (memory-mapped); tensors are dequantised to
float32 by :mod:`sotjax.models.dequant`. Supported architectures: ``llama`` (Llama 1–3, SmolLM,
Mistral converted as llama) and ``qwen2``.

llama.cpp's converter permutes the rows of ``attn_q``/``attn_k`` for ``llama`` so that its RoPE
rotates adjacent pairs ``(2f, 2f+1)``; Hugging Face rotates ``(f, f + head_dim/2)``. Within each head
the GGUF row ``2f + r`` (r ∈ {0, 1}) is the HF row ``f + r·head_dim/2``, so we undo it with

    W_hf = W_gguf.reshape(heads, head_dim/2, 2, in).swapaxes(1, 2).reshape(heads·head_dim, in).

``qwen2`` uses the "NeoX" (rotate-half) RoPE in llama.cpp and is stored unpermuted.

Bad files are one :class:`~sotjax.errors.SotjaxInputError` line naming the file: not a regular
file, not GGUF or truncated (the reader fails, or a tensor's data is short), metadata of the wrong
type or range (e.g. a string or ``0`` where a positive integer count belongs; counts are at most
:data:`MAX_METADATA_INT`), an unsupported architecture or tensor type.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from sotjax.errors import SotjaxInputError, shorten
from sotjax.io import check_input_file
from sotjax.models.dequant import SUPPORTED_TYPES, dequantize
from sotjax.models.llama import LlamaConfig, LlamaModel
from sotjax.models.weights import llama_from_tensors

PERMUTED_ARCHS = ("llama",)
SUPPORTED_ARCHS = ("llama", "qwen2")
#: largest integer accepted for a size/count in GGUF metadata
MAX_METADATA_INT = 1 << 31

# HF LlamaModel name -> GGUF name ("{}" = block index)
_GGUF_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
    "layers.{}.post_attention_layernorm.weight": "blk.{}.ffn_norm.weight",
    "layers.{}.self_attn.q_proj.weight": "blk.{}.attn_q.weight",
    "layers.{}.self_attn.k_proj.weight": "blk.{}.attn_k.weight",
    "layers.{}.self_attn.v_proj.weight": "blk.{}.attn_v.weight",
    "layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output.weight",
    "layers.{}.self_attn.q_proj.bias": "blk.{}.attn_q.bias",
    "layers.{}.self_attn.k_proj.bias": "blk.{}.attn_k.bias",
    "layers.{}.self_attn.v_proj.bias": "blk.{}.attn_v.bias",
    "layers.{}.mlp.gate_proj.weight": "blk.{}.ffn_gate.weight",
    "layers.{}.mlp.up_proj.weight": "blk.{}.ffn_up.weight",
    "layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
}


@dataclass
class GGUFFile:
    """Metadata (plain Python values) and tensor records of one GGUF file."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, Any]  # name -> gguf.ReaderTensor

    def tensor(self, name: str) -> np.ndarray:
        """Dequantised float32 tensor in numpy order (GGUF ``ne`` reversed)."""
        if name not in self.tensors:
            raise SotjaxInputError(f"{self.path}: tensor '{name}' is missing")
        t = self.tensors[name]
        type_name = t.tensor_type.name
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if type_name not in SUPPORTED_TYPES:
            raise SotjaxInputError(
                f"{self.path}: tensor '{name}' has unsupported GGUF type {type_name} "
                f"(supported: {', '.join(SUPPORTED_TYPES)})"
            )
        try:
            return dequantize(t.data, type_name, shape)
        except SotjaxInputError:
            raise
        except ValueError as err:  # data shorter than the shape needs (a truncated file)
            raise SotjaxInputError(f"{self.path}: tensor '{name}': {' '.join(str(err).split())[:200]}") from None


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file; raise :class:`SotjaxInputError` if it is unreadable or not GGUF."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise SotjaxInputError(f"{path}: model file not found")
    check_input_file(path)
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as err:  # the reader raises ValueError/struct.error/OSError on bad files
        raise SotjaxInputError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            metadata[key] = field.contents()
        except Exception:  # pragma: no cover - exotic field types we never read
            continue
    tensors = {t.name: t for t in reader.tensors}
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)


def _meta(f: GGUFFile, key: str, default: Any = None, required: bool = False) -> Any:
    if key in f.metadata:
        return f.metadata[key]
    if required:
        raise SotjaxInputError(f"{f.path}: GGUF metadata key '{key}' is missing")
    return default


def _meta_int(f: GGUFFile, key: str, default: Any = None, required: bool = False) -> int:
    """A positive integer (at most :data:`MAX_METADATA_INT`) from the metadata; one line naming the key."""
    value = _meta(f, key, default, required)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_METADATA_INT:
        raise SotjaxInputError(f"{f.path}: GGUF metadata '{key}' must be a positive integer "
                               f"(at most {MAX_METADATA_INT}), got {shorten(value)}")
    return value


def _meta_float(f: GGUFFile, key: str, default: float) -> float:
    """A finite positive number from the metadata; one line naming the key."""
    value = _meta(f, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise SotjaxInputError(f"{f.path}: GGUF metadata '{key}' must be a positive number, got {shorten(value)}")
    return float(value)


def gguf_llama_config(f: GGUFFile) -> LlamaConfig:
    """Translate GGUF metadata (``{arch}.block_count`` ...) into a :class:`LlamaConfig`."""
    arch = _meta(f, "general.architecture", required=True)
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHS:
        raise SotjaxInputError(
            f"{f.path}: GGUF architecture {shorten(arch)} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    if "token_embd.weight" not in f.tensors:
        raise SotjaxInputError(f"{f.path}: tensor 'token_embd.weight' is missing")
    hidden = _meta_int(f, f"{arch}.embedding_length", required=True)
    heads = _meta_int(f, f"{arch}.attention.head_count", required=True)
    kv_heads = _meta_int(f, f"{arch}.attention.head_count_kv", heads)
    head_dim = _meta_int(f, f"{arch}.attention.key_length", max(hidden // heads, 1))
    embd_shape = f.tensors["token_embd.weight"].shape
    if len(embd_shape) != 2:
        raise SotjaxInputError(f"{f.path}: tensor 'token_embd.weight' must be 2-D, got shape {shorten(embd_shape)}")
    vocab = int(embd_shape[1])
    rope_theta = _meta_float(f, f"{arch}.rope.freq_base", 10000.0)
    factors: tuple[float, ...] | None = None
    scaling = _meta(f, f"{arch}.rope.scaling.type", "none")
    if "rope_freqs.weight" in f.tensors:  # Llama 3.1-style per-frequency divisors
        factors = tuple(float(x) for x in f.tensor("rope_freqs.weight").reshape(-1))
    elif scaling == "linear":
        factor = _meta_float(f, f"{arch}.rope.scaling.factor", 1.0)
        factors = (factor,) * (head_dim // 2)
    elif scaling not in ("none", None):
        raise SotjaxInputError(f"{f.path}: RoPE scaling type {shorten(scaling)} is not supported")
    try:
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=_meta_int(f, f"{arch}.feed_forward_length", required=True),
            num_layers=_meta_int(f, f"{arch}.block_count", required=True),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_meta_float(f, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=rope_theta,
            rope_freq_factors=factors,
            attention_bias="blk.0.attn_q.bias" in f.tensors,
        )
    except SotjaxInputError:
        raise
    except ValueError as err:
        raise SotjaxInputError(f"{f.path}: invalid model configuration: {err}") from None


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (see the module docstring); works for weights and biases."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf_llama(path: str | os.PathLike, dtype: jnp.dtype = jnp.float32) -> tuple[LlamaModel, GGUFFile]:
    """Build the decoder from a GGUF file; returns the model and the parsed file (for the tokenizer)."""
    f = read_gguf(path)
    config = gguf_llama_config(f)
    arch = f.metadata["general.architecture"]

    def get(hf_name: str) -> np.ndarray:
        for pattern, gguf_pattern in _GGUF_NAMES.items():
            if "{}" in pattern:
                prefix, suffix = pattern.split("{}")
                if hf_name.startswith(prefix) and hf_name.endswith(suffix):
                    index = hf_name[len(prefix) : len(hf_name) - len(suffix)]
                    if index.isdigit():
                        gguf_name = gguf_pattern.format(index)
                        break
            elif hf_name == pattern:
                gguf_name = gguf_pattern
                break
        else:  # pragma: no cover - programming error
            raise KeyError(hf_name)
        w = f.tensor(gguf_name)
        if arch in PERMUTED_ARCHS and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            w = unpermute_rope_rows(w, config.num_heads if ".attn_q." in gguf_name else config.num_kv_heads)
        return w

    try:
        model = llama_from_tensors(config, get, dtype)
    except SotjaxInputError:
        raise
    except ValueError as err:
        raise SotjaxInputError(f"{f.path}: {' '.join(str(err).split())[:300]}") from None
    return model, f
