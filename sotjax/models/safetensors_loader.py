"""Load Hugging Face checkpoint directories (``config.json`` + ``*.safetensors``) without torch.

Reads single files (``model.safetensors``) and sharded checkpoints (``model.safetensors.index.json``
with a ``weight_map``). The safetensors format is an 8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets}}`` and raw little-endian data; we memory-map it with numpy
(bfloat16/float8 through ``ml_dtypes``), so nothing is unpickled and no code is executed.
Architecture prefixes (``model.``, ``bert.``) are stripped; heads (``lm_head``, pooler) are ignored.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from sotjax.errors import SotjaxInputError
from sotjax.models.bert import BertConfig, BertModel
from sotjax.models.llama import LlamaConfig, LlamaModel, llama3_freq_factors
from sotjax.models.weights import bert_from_tensors, llama_from_tensors

LLAMA_TYPES = ("llama", "mistral", "qwen2", "smollm3")
BERT_TYPES = ("bert",)


def _dtype(name: str) -> np.dtype:
    import ml_dtypes

    table = {
        "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
        "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
        "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    }
    if name not in table:
        raise KeyError(name)
    return np.dtype(table[name])


class SafetensorsFile:
    """Memory-mapped view of one ``.safetensors`` file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                if header_len > 100_000_000:
                    raise ValueError("header too large")
                self.header: dict[str, Any] = json.loads(fh.read(header_len))
        except (OSError, ValueError, struct.error) as err:
            raise SotjaxInputError(f"{path}: not a readable safetensors file ({err})") from None
        self.header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self._mm: np.memmap | None = None

    def names(self) -> list[str]:
        return list(self.header)

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        try:
            dtype = _dtype(info["dtype"])
        except KeyError:
            raise SotjaxInputError(f"{self.path}: tensor '{name}' has unsupported dtype {info['dtype']}") from None
        raw = self._mm[self.data_start + start : self.data_start + end]
        shape = tuple(info["shape"])
        if raw.size != int(np.prod(shape)) * dtype.itemsize:
            raise SotjaxInputError(f"{self.path}: tensor '{name}' has inconsistent size")
        return np.asarray(raw.view(dtype).reshape(shape), dtype=np.float32)


class Checkpoint:
    """All tensors of a (possibly sharded) checkpoint directory, looked up by name."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        self.files: dict[str, SafetensorsFile] = {}
        self.location: dict[str, str] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise SotjaxInputError(f"{index}: invalid index file ({err})") from None
            for name, shard in weight_map.items():
                self.location[name] = shard
        else:
            shards = sorted(p.name for p in directory.glob("*.safetensors"))
            if not shards:
                raise SotjaxInputError(f"{directory}: no *.safetensors weights found")
            for shard in shards:
                for name in self._file(shard).names():
                    self.location[name] = shard

    def _file(self, shard: str) -> SafetensorsFile:
        if shard not in self.files:
            path = self.directory / shard
            if not path.is_file():
                raise SotjaxInputError(f"{path}: shard listed in the index is missing")
            self.files[shard] = SafetensorsFile(path)
        return self.files[shard]

    def names(self) -> list[str]:
        return list(self.location)

    def get(self, name: str) -> np.ndarray:
        if name not in self.location:
            raise SotjaxInputError(f"{self.directory}: tensor '{name}' is missing")
        return self._file(self.location[name]).get(name)

    def getter(self, anchor: str, prefixes: tuple[str, ...]):
        """A getter that prepends the first prefix under which ``anchor`` exists."""
        for prefix in prefixes:
            if prefix + anchor in self.location:
                break
        else:
            raise SotjaxInputError(f"{self.directory}: tensor '{anchor}' is missing (tried prefixes {prefixes})")

        def get(name: str) -> np.ndarray:
            full = prefix + name
            if full not in self.location and name.endswith((".weight", ".bias")) and "LayerNorm" in name:
                legacy = full.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
                if legacy in self.location:
                    full = legacy
            return self.get(full)

        return get


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise SotjaxInputError(f"{directory}: config.json is missing (not a Hugging Face checkpoint directory)")
    try:
        config = json.loads(path.read_text())
    except ValueError as err:
        raise SotjaxInputError(f"{path}: invalid JSON ({err})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise SotjaxInputError(f"{path}: field 'model_type' is missing")
    return config


def _field(cfg: dict, path: Path, key: str, default: Any = ..., *alternatives: str) -> Any:
    for k in (key, *alternatives):
        if cfg.get(k) is not None:
            return cfg[k]
    if default is ...:
        raise SotjaxInputError(f"{path}: field '{key}' is missing")
    return default


def hf_llama_config(cfg: dict, path: Path) -> LlamaConfig:
    """``config.json`` of a Llama/Mistral/Qwen2 checkpoint -> :class:`LlamaConfig` (transformers 4 and 5 keys)."""
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    heads = int(_field(cfg, path, "num_attention_heads"))
    hidden = int(_field(cfg, path, "hidden_size"))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    factors = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "linear":
            factors = (float(scaling["factor"]),) * (head_dim // 2)
        elif kind == "llama3":
            factors = llama3_freq_factors(
                head_dim, theta, float(scaling["factor"]), float(scaling["low_freq_factor"]),
                float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]),
            )
        elif kind != "default":
            raise SotjaxInputError(f"{path}: RoPE scaling type '{kind}' is not supported")
    try:
        return LlamaConfig(
            vocab_size=int(_field(cfg, path, "vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(_field(cfg, path, "intermediate_size")),
            num_layers=int(_field(cfg, path, "num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(_field(cfg, path, "num_key_value_heads", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(_field(cfg, path, "rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_freq_factors=factors,
            attention_bias=bool(cfg.get("attention_bias", cfg["model_type"] == "qwen2")),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
        )
    except ValueError as err:
        raise SotjaxInputError(f"{path}: invalid model configuration: {err}") from None


def hf_bert_config(cfg: dict, path: Path) -> BertConfig:
    """``config.json`` of a BERT checkpoint -> :class:`BertConfig`."""
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise SotjaxInputError(f"{path}: hidden_act '{cfg['hidden_act']}' is not supported (only 'gelu')")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise SotjaxInputError(f"{path}: position_embedding_type '{cfg['position_embedding_type']}' is not supported")
    try:
        return BertConfig(
            vocab_size=int(_field(cfg, path, "vocab_size")),
            hidden_size=int(_field(cfg, path, "hidden_size")),
            intermediate_size=int(_field(cfg, path, "intermediate_size")),
            num_layers=int(_field(cfg, path, "num_hidden_layers")),
            num_heads=int(_field(cfg, path, "num_attention_heads")),
            max_position_embeddings=int(_field(cfg, path, "max_position_embeddings", 512)),
            type_vocab_size=int(_field(cfg, path, "type_vocab_size", 2)),
            layer_norm_eps=float(_field(cfg, path, "layer_norm_eps", 1e-12)),
        )
    except ValueError as err:
        raise SotjaxInputError(f"{path}: invalid model configuration: {err}") from None


def load_hf_checkpoint(directory: str | os.PathLike, dtype: jnp.dtype = jnp.float32) -> LlamaModel | BertModel:
    """Load a Llama-family or BERT checkpoint directory into the matching nnx model."""
    directory = Path(directory)
    if not directory.is_dir():
        raise SotjaxInputError(f"{directory}: model directory not found")
    cfg = read_config(directory)
    config_path = directory / "config.json"
    model_type = cfg["model_type"]
    ckpt = Checkpoint(directory)
    try:
        if model_type in LLAMA_TYPES:
            config = hf_llama_config(cfg, config_path)
            return llama_from_tensors(config, ckpt.getter("embed_tokens.weight", ("model.", "")), dtype)
        if model_type in BERT_TYPES:
            config = hf_bert_config(cfg, config_path)
            anchor = "embeddings.word_embeddings.weight"
            return bert_from_tensors(config, ckpt.getter(anchor, ("", "bert.", "model.")), dtype)
    except SotjaxInputError:
        raise
    except ValueError as err:
        raise SotjaxInputError(f"{directory}: {err}") from None
    raise SotjaxInputError(
        f"{config_path}: model_type '{model_type}' is not supported (supported: {', '.join(LLAMA_TYPES + BERT_TYPES)})"
    )
