"""Load Hugging Face checkpoint directories (``config.json`` + ``*.safetensors``) without torch.

Reads single files (``model.safetensors``) and sharded checkpoints (``model.safetensors.index.json``
with a ``weight_map``). The safetensors format is an 8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets}}`` and raw little-endian data; we memory-map it with numpy
(bfloat16/float8 through ``ml_dtypes``), so nothing is unpickled and no code is executed.
Architecture prefixes (``model.``, ``bert.``) are stripped; heads (``lm_head``, pooler) are ignored.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from sotjax.errors import SotjaxInputError, shorten
from sotjax.io import check_input_file, hub_cache_roots, read_json_file, resolve_inside
from sotjax.models.bert import BertConfig, BertModel
from sotjax.models.llama import LlamaConfig, LlamaModel, llama3_freq_factors
from sotjax.models.weights import bert_from_tensors, llama_from_tensors

LLAMA_TYPES = ("llama", "mistral", "qwen2", "smollm3")
BERT_TYPES = ("bert",)
#: largest safetensors JSON header (bytes), as in the format's reference implementation
MAX_HEADER_BYTES = 100_000_000
#: largest ``config.json`` / ``model.safetensors.index.json`` read (bytes)
MAX_CONFIG_JSON_BYTES = 16 << 20
#: largest integer accepted for a size in ``config.json`` (vocabulary, widths, layer counts)
MAX_CONFIG_INT = 1 << 31
DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL")


def _dtype(name: str) -> np.dtype:
    import ml_dtypes

    table = {
        "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
        "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
        "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    }
    if not isinstance(name, str) or name not in table:
        raise KeyError(name)
    return np.dtype(table[name])


def _why(err: BaseException) -> str:
    """An exception's message on one line, at most 200 characters."""
    return " ".join(str(err).split())[:200] or type(err).__name__


class _Entry:
    __slots__ = ("dtype", "shape", "start", "end")

    def __init__(self, dtype: np.dtype, shape: tuple[int, ...], start: int, end: int) -> None:
        self.dtype, self.shape, self.start, self.end = dtype, shape, start, end


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsFile:
    """Memory-mapped view of one ``.safetensors`` file, its header validated when opened.

    Every problem is one :class:`SotjaxInputError` line naming the file (and the tensor): not a
    regular file, shorter than 8 bytes, a header length beyond the file or :data:`MAX_HEADER_BYTES`,
    a header that is not UTF-8 JSON object text, an entry that is not an object with ``dtype``
    (one of :data:`DTYPES`), ``shape`` (non-negative integers) and ``data_offsets`` (two integers
    ``0 <= start <= end <= data size``), a shape whose byte count differs from the offsets, and
    tensors whose data overlap.
    """

    def __init__(self, path: Path):
        self.path = path = check_input_file(path)
        size = path.stat().st_size
        if size < 8:
            raise SotjaxInputError(f"{path}: not a readable safetensors file (only {size} bytes)")
        try:
            with open(path, "rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                if header_len > MAX_HEADER_BYTES:
                    raise SotjaxInputError(f"{path}: not a readable safetensors file (header length {header_len} "
                                           f"is over the format's {MAX_HEADER_BYTES} bytes)")
                if header_len > size - 8:
                    raise SotjaxInputError(f"{path}: not a readable safetensors file (header length {header_len} "
                                           f"is beyond the file's {size} bytes: truncated?)")
                raw = fh.read(header_len)
        except (OSError, struct.error) as err:
            raise SotjaxInputError(f"{path}: not a readable safetensors file ({_why(err)})") from None
        try:
            header = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise SotjaxInputError(f"{path}: not a readable safetensors file (header is not UTF-8)") from None
        except ValueError as err:
            raise SotjaxInputError(f"{path}: not a readable safetensors file (header is not JSON: "
                                   f"{_why(err)})") from None
        except RecursionError:
            raise SotjaxInputError(f"{path}: not a readable safetensors file (header nested too deeply)") from None
        if not isinstance(header, dict):
            raise SotjaxInputError(f"{path}: safetensors header must be a JSON object, got {type(header).__name__}")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not isinstance(metadata, dict):
            raise SotjaxInputError(f"{path}: safetensors '__metadata__' must be an object")
        self.data_start = 8 + header_len
        self.tensors = self._validate(header, size - self.data_start)
        self._mm: np.memmap | None = None

    def _validate(self, header: dict[str, Any], data_size: int) -> dict[str, _Entry]:
        tensors: dict[str, _Entry] = {}
        for name, info in header.items():
            where = f"{self.path}: tensor {shorten(name)}"
            if not isinstance(info, dict):
                raise SotjaxInputError(f"{where}: entry must be an object with dtype, shape and data_offsets, "
                                       f"got {type(info).__name__}")
            for key in ("dtype", "shape", "data_offsets"):
                if key not in info:
                    raise SotjaxInputError(f"{where}: field '{key}' is missing")
            try:
                dtype = _dtype(info["dtype"])
            except (KeyError, TypeError):
                raise SotjaxInputError(f"{where}: unsupported dtype {shorten(info['dtype'])} "
                                       f"(supported: {', '.join(DTYPES)})") from None
            shape = info["shape"]
            if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
                raise SotjaxInputError(f"{where}: shape must be a list of non-negative integers, got {shorten(shape)}")
            offsets = info["data_offsets"]
            if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(o) for o in offsets):
                raise SotjaxInputError(f"{where}: data_offsets must be two non-negative integers [start, end], "
                                       f"got {shorten(offsets)}")
            start, end = offsets
            if start > end:
                raise SotjaxInputError(f"{where}: data_offsets start {start} is after end {end}")
            if end > data_size:
                raise SotjaxInputError(f"{where}: data_offsets end {end} is beyond the file's {data_size} data bytes "
                                       "(truncated?)")
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes != end - start:
                raise SotjaxInputError(f"{where}: shape {shorten(shape)} of {info['dtype']} needs {shorten(nbytes)} "
                                       f"bytes but data_offsets hold {end - start}")
            tensors[name] = _Entry(dtype, tuple(shape), start, end)
        spans = sorted((e.start, e.end, n) for n, e in tensors.items() if e.end > e.start)
        for (_, prev_end, prev), (start, _, name) in zip(spans, spans[1:], strict=False):
            if start < prev_end:
                raise SotjaxInputError(f"{self.path}: tensors {shorten(prev)} and {shorten(name)} overlap "
                                       "(data_offsets)")
        return tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> np.ndarray:
        entry = self.tensors.get(name)
        if entry is None:
            raise SotjaxInputError(f"{self.path}: tensor {shorten(name)} is missing")
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mm[self.data_start + entry.start : self.data_start + entry.end]
        return np.asarray(raw.view(entry.dtype).reshape(entry.shape), dtype=np.float32)


class Checkpoint:
    """All tensors of a (possibly sharded) checkpoint directory, looked up by name.

    Shards named by ``model.safetensors.index.json`` (its ``weight_map``) must be relative paths
    that stay inside the directory (see :func:`sotjax.io.resolve_inside`; a Hugging
    Face hub cache snapshot may link into its ``blobs`` folder).
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self._roots = hub_cache_roots(directory)
        index = directory / "model.safetensors.index.json"
        self.files: dict[str, SafetensorsFile] = {}
        self.location: dict[str, str] = {}
        self._listed_in: Path | None = None
        if index.exists() or index.is_symlink():
            self._listed_in = index
            model_file(directory, index.name)
            data = read_json_file(index, MAX_CONFIG_JSON_BYTES, "safetensors index")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise SotjaxInputError(f"{index}: invalid index file (field 'weight_map' must be a non-empty object "
                                       "of tensor name -> shard file)")
            checked: set[str] = set()
            for name, shard in weight_map.items():
                if not isinstance(shard, str) or shard not in checked:
                    resolve_inside(directory, shard, index, f"weight_map[{shorten(name)}] shard", self._roots)
                    checked.add(shard)
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
            resolve_inside(self.directory, shard, self._listed_in or self.directory, "file", self._roots)
            if not path.exists():
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


def model_file(directory: Path, name: str) -> Path:
    """``directory / name`` after checking that it resolves inside the model directory (or its hub blobs)."""
    resolve_inside(directory, name, directory, "file", hub_cache_roots(directory))
    return directory / name


def read_config(directory: Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory: a JSON object with a string ``model_type``."""
    path = directory / "config.json"
    if not (path.exists() or path.is_symlink()):
        raise SotjaxInputError(f"{directory}: config.json is missing (not a Hugging Face checkpoint directory)")
    model_file(directory, "config.json")
    config = read_json_file(path, MAX_CONFIG_JSON_BYTES, "config.json")
    if not isinstance(config, dict) or "model_type" not in config:
        raise SotjaxInputError(f"{path}: field 'model_type' is missing")
    if not isinstance(config["model_type"], str):
        raise SotjaxInputError(f"{path}: field 'model_type' must be a string, got {shorten(config['model_type'])}")
    return config


def _field(cfg: dict, path: Path, key: str, default: Any = ..., *alternatives: str) -> Any:
    for k in (key, *alternatives):
        if cfg.get(k) is not None:
            return cfg[k]
    if default is ...:
        raise SotjaxInputError(f"{path}: field '{key}' is missing")
    return default


def _int(cfg: dict, path: Path, key: str, default: Any = ..., *alternatives: str) -> int:
    """A positive integer field (at most :data:`MAX_CONFIG_INT`); one-line error naming it."""
    value = _field(cfg, path, key, default, *alternatives)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONFIG_INT:
        raise SotjaxInputError(f"{path}: field '{key}' must be a positive integer (at most {MAX_CONFIG_INT}), "
                               f"got {shorten(value)}")
    return value


def _float(cfg: dict, path: Path, key: str, default: Any = ..., positive: bool = True) -> float:
    """A finite (and by default positive) number field; one-line error naming it."""
    value = _field(cfg, path, key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        kind = "a positive number" if positive else "a finite number"
        raise SotjaxInputError(f"{path}: field '{key}' must be {kind}, got {shorten(value)}")
    return float(value)


def _mapping(cfg: dict, path: Path, key: str) -> dict:
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SotjaxInputError(f"{path}: field '{key}' must be an object, got {shorten(value)}")
    return value


def hf_llama_config(cfg: dict, path: Path) -> LlamaConfig:
    """``config.json`` of a Llama/Mistral/Qwen2 checkpoint -> :class:`LlamaConfig` (transformers 4 and 5 keys)."""
    rope = _mapping(cfg, path, "rope_parameters")
    rope_type = rope.get("rope_type", "default")
    scaling = _mapping(cfg, path, "rope_scaling") or (rope if rope_type != "default" else {})
    theta = _float(rope, path, "rope_theta", cfg.get("rope_theta", 10000.0))
    heads = _int(cfg, path, "num_attention_heads")
    hidden = _int(cfg, path, "hidden_size")
    head_dim = _int(cfg, path, "head_dim", max(hidden // heads, 1))
    factors = None
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "linear":
            factors = (_float(scaling, path, "factor"),) * (head_dim // 2)
        elif kind == "llama3":
            low, high = _float(scaling, path, "low_freq_factor"), _float(scaling, path, "high_freq_factor")
            if high <= low:
                raise SotjaxInputError(f"{path}: rope_scaling high_freq_factor ({high}) must exceed "
                                       f"low_freq_factor ({low})")
            factors = llama3_freq_factors(
                head_dim, theta, _float(scaling, path, "factor"), low, high,
                _int(scaling, path, "original_max_position_embeddings"),
            )
        elif kind != "default":
            raise SotjaxInputError(f"{path}: RoPE scaling type {shorten(kind)} is not supported")
    try:
        return LlamaConfig(
            vocab_size=_int(cfg, path, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(cfg, path, "intermediate_size"),
            num_layers=_int(cfg, path, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=_int(cfg, path, "num_key_value_heads", heads),
            head_dim=head_dim,
            rms_norm_eps=_float(cfg, path, "rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_freq_factors=factors,
            attention_bias=bool(cfg.get("attention_bias", cfg["model_type"] == "qwen2")),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
        )
    except SotjaxInputError:
        raise
    except ValueError as err:
        raise SotjaxInputError(f"{path}: invalid model configuration: {err}") from None


def hf_bert_config(cfg: dict, path: Path) -> BertConfig:
    """``config.json`` of a BERT checkpoint -> :class:`BertConfig`."""
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise SotjaxInputError(f"{path}: hidden_act {shorten(cfg['hidden_act'])} is not supported (only 'gelu')")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise SotjaxInputError(
            f"{path}: position_embedding_type {shorten(cfg['position_embedding_type'])} is not supported")
    try:
        return BertConfig(
            vocab_size=_int(cfg, path, "vocab_size"),
            hidden_size=_int(cfg, path, "hidden_size"),
            intermediate_size=_int(cfg, path, "intermediate_size"),
            num_layers=_int(cfg, path, "num_hidden_layers"),
            num_heads=_int(cfg, path, "num_attention_heads"),
            max_position_embeddings=_int(cfg, path, "max_position_embeddings", 512),
            type_vocab_size=_int(cfg, path, "type_vocab_size", 2),
            layer_norm_eps=_float(cfg, path, "layer_norm_eps", 1e-12),
        )
    except SotjaxInputError:
        raise
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
    if model_type not in LLAMA_TYPES + BERT_TYPES:
        raise SotjaxInputError(f"{config_path}: model_type {shorten(model_type)} is not supported "
                               f"(supported: {', '.join(LLAMA_TYPES + BERT_TYPES)})")
    ckpt = Checkpoint(directory)
    try:
        if model_type in LLAMA_TYPES:
            llama = hf_llama_config(cfg, config_path)
            return llama_from_tensors(llama, ckpt.getter("embed_tokens.weight", ("model.", "")), dtype)
        bert = hf_bert_config(cfg, config_path)
        anchor = "embeddings.word_embeddings.weight"
        return bert_from_tensors(bert, ckpt.getter(anchor, ("", "bert.", "model.")), dtype)
    except SotjaxInputError:
        raise
    except ValueError as err:
        raise SotjaxInputError(f"{directory}: {_why(err)}") from None
