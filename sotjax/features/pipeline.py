"""Texts -> feature vectors: templating, tokenising, length bucketing, batched jitted forward, cache.

Feature per text (``H`` = hidden states at ``config.layer`` for the right-padded token ids):

- decoder (Llama family, SOT's feature): ``z = H[len − 1]``, the state at the last real token. With
  ``layer=-1`` this is after the final RMSNorm (= Hugging Face ``last_hidden_state``).
- encoder (BERT family): ``z = normalise(Σ_t m_t H_t / Σ_t m_t)`` (masked mean, L2 norm).
- ``pooling="mean"`` on a decoder: ``z = Σ_t m_t H_t / Σ_t m_t`` (masked mean over the real tokens);
  ``pooling="last"`` on an encoder: ``z = H[len − 1]`` (the closing ``[SEP]`` state).

Batching: the unique, uncached texts are sorted by token length and cut into batches of
``batch_size``; each batch is padded to the smallest *bucket* ≥ its longest text (powers of two from
16, capped by ``max_length``, plus ``max_length``) and the last, short batch to a power of two rows.
So only a handful of shapes is ever compiled; each shape is compiled ahead of time once per process
and its compile time is reported separately. Rows are sharded over the local devices along the batch
axis (``NamedSharding(mesh, P("data"))``, weights replicated), i.e. data parallel.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sotjax.errors import SotjaxInputError
from sotjax.features.cache import EmbeddingCache, text_key
from sotjax.features.config import DEFAULT_POOLING, FeatureConfig, resolve_pooling
from sotjax.features.templates import format_texts, validate_pairs

MIN_BUCKET = 16


@dataclass
class EmbedReport:
    """What happened during one :func:`embed_texts` call."""

    model: str
    fingerprint: str
    dim: int
    n_texts: int
    n_unique: int = 0
    n_cached: int = 0
    n_computed: int = 0
    n_truncated: int = 0
    n_corrupt_chunks: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0
    compute_seconds: float = 0.0
    tokens: int = 0
    padded_tokens: int = 0
    pooling: str = ""  # the pooling used ("last" / "mean"; "auto" resolved for the model kind)
    shapes_compiled: list[tuple[int, int]] = field(default_factory=list)

    @property
    def texts_per_second(self) -> float:
        """Computed texts per second of forward time (compilation excluded)."""
        return self.n_computed / self.compute_seconds if self.compute_seconds > 0 else float("nan")

    def summary(self) -> str:
        parts = [f"embedded {self.n_texts} texts with {self.model} (d={self.dim})",
                 f"{self.n_cached} from cache", f"{self.n_computed} computed"]
        if self.n_computed:
            parts.append(f"{self.texts_per_second:.1f} texts/s")
            parts.append(f"compile {self.compile_seconds:.1f}s for {len(self.shapes_compiled)} shapes")
        if self.n_truncated:
            parts.append(f"{self.n_truncated} truncated")
        if self.n_corrupt_chunks:
            parts.append(f"{self.n_corrupt_chunks} corrupted cache chunks recomputed")
        return ", ".join(parts)


def length_buckets(max_length: int) -> list[int]:
    """Padded sequence lengths: 16, 32, 64, ... below ``max_length``, then ``max_length``."""
    buckets, b = [], MIN_BUCKET
    while b < max_length:
        buckets.append(b)
        b *= 2
    return buckets + [max_length]


def plan_batches(lengths: Sequence[int], batch_size: int, max_length: int, n_devices: int = 1
                 ) -> list[tuple[np.ndarray, int, int]]:
    """``[(indices, rows, seq_len)]``: indices into ``lengths``, padded batch rows and bucket length.

    Longest texts first; ``rows`` is ``batch_size`` rounded up to a multiple of ``n_devices`` for full
    batches, and the next power of two (same rounding) for the last one.
    """
    if not len(lengths):
        return []
    order = np.argsort(-np.asarray(lengths), kind="stable")
    buckets = np.asarray(length_buckets(max_length))
    full_rows = math.ceil(batch_size / n_devices) * n_devices
    plan = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        longest = max(lengths[i] for i in idx)
        seq = int(buckets[np.searchsorted(buckets, longest)])
        rows = full_rows if len(idx) == batch_size else min(full_rows, 1 << (len(idx) - 1).bit_length())
        rows = math.ceil(rows / n_devices) * n_devices
        plan.append((idx, rows, seq))
    return plan


class ForwardRunner:
    """Jitted ``(weights, ids, lengths) -> features`` for one loaded model and layer, AOT-compiled per shape."""

    def __init__(self, loaded: Any, layer: int, pooling: str = "auto"):
        import jax
        from flax import nnx
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        try:
            loaded.model.config.resolve_layer(layer)
        except ValueError as err:
            raise SotjaxInputError(f"layer: {err}") from None
        self.devices = jax.local_devices()
        graphdef, state = nnx.split(loaded.model)
        kind = loaded.kind
        pool = resolve_pooling(pooling, kind)

        def features(state: Any, ids: jax.Array, lengths: jax.Array) -> jax.Array:
            model = nnx.merge(graphdef, state)
            if pool == DEFAULT_POOLING[kind]:  # the model's own feature (bit-identical to before)
                if kind == "decoder":
                    return model.last_token_features(ids, lengths, layer)
                return model.mean_pooled_features(ids, lengths, layer)
            return pool_states(model, ids, lengths, layer, pool)

        self._fn = jax.jit(features)
        self._data: NamedSharding | None
        if len(self.devices) > 1:
            mesh = Mesh(np.array(self.devices), ("data",))
            self._data = NamedSharding(mesh, PartitionSpec("data"))
            state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        else:
            self._data = None
        self.state = state
        self.compiled: dict[tuple[int, int], Any] = {}

    @property
    def n_devices(self) -> int:
        return len(self.devices)

    def _put(self, x: np.ndarray) -> Any:
        import jax

        return jax.device_put(x, self._data) if self._data is not None else jax.device_put(x)

    def __call__(self, ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, float]:
        """Features (rows, d) float32 and the seconds spent compiling (0 when the shape is cached)."""
        ids_dev, len_dev = self._put(ids.astype(np.int32)), self._put(lengths.astype(np.int32))
        compile_s = 0.0
        shape = ids.shape
        if shape not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[shape] = self._fn.lower(self.state, ids_dev, len_dev).compile()
            compile_s = time.perf_counter() - t0
        out = self.compiled[shape](self.state, ids_dev, len_dev)
        return np.asarray(out, dtype=np.float32), compile_s


def pool_states(model: Any, ids: Any, lengths: Any, layer: int, pooling: str) -> Any:
    """Hidden states at ``layer`` of right-padded ``ids`` pooled over each row's ``lengths`` real tokens:
    ``"last"``: ``H[len − 1]``; ``"mean"``: ``Σ_{t<len} H_t / len`` (b, d) float32 (traceable)."""
    import jax.numpy as jnp

    s = ids.shape[1]
    mask = jnp.arange(s)[None, :] < lengths[:, None]
    h = model.hidden_states(ids, mask, layer).astype(jnp.float32)
    if pooling == "last":
        idx = jnp.clip(lengths - 1, 0, s - 1)
        return jnp.take_along_axis(h, idx[:, None, None], axis=1)[:, 0]
    m = mask.astype(jnp.float32)[..., None]
    return jnp.sum(h * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def _runner(loaded: Any, layer: int, pooling: str = "auto") -> ForwardRunner:
    key = (layer, resolve_pooling(pooling, loaded.kind))
    if key not in loaded.runners:
        loaded.runners[key] = ForwardRunner(loaded, layer, pooling)
    return loaded.runners[key]


def embed_texts_report(
    prompts: Sequence[str],
    responses: Sequence[str] | None = None,
    config: FeatureConfig | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, EmbedReport]:
    """Like :func:`embed_texts`, also returning an :class:`EmbedReport`."""
    from tqdm.auto import tqdm

    from sotjax.models.registry import load_model

    config = config or FeatureConfig()
    t_start = time.perf_counter()
    validate_pairs(prompts, responses)  # fail fast, before loading a model
    loaded = load_model(config.model, config.dtype)
    tok = loaded.tokenizer
    texts = format_texts(prompts, responses, config.template, tok.chat_template, tok.bos_token, tok.eos_token,
                         template_source=str(loaded.path))
    template = config.template if responses is not None else "none"
    chat = template == "chat"
    if loaded.max_positions is not None and config.max_length > loaded.max_positions:
        raise SotjaxInputError(
            f"max_length {config.max_length} exceeds the model's {loaded.max_positions} positions ({loaded.name})"
        )
    pooling = resolve_pooling(config.pooling, loaded.kind)
    report = EmbedReport(model=loaded.name, fingerprint=loaded.fingerprint, dim=loaded.hidden_dim, n_texts=len(texts),
                         pooling=pooling)

    keys = [text_key(t) for t in texts]
    first: dict[str, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    report.n_unique = len(first)
    vectors: dict[str, np.ndarray] = {}
    cache = None
    if config.cache_dir is not None:
        meta = {
            "model_fingerprint": loaded.fingerprint, "kind": loaded.kind, "template": template,
            "max_length": config.max_length, "truncation_side": config.truncation_side,
            "layer": config.layer, "dtype": config.dtype,
        }
        if pooling != DEFAULT_POOLING[loaded.kind]:
            meta["pooling"] = pooling  # the model's own pooling keeps the earlier caches valid
        cache = EmbeddingCache(config.cache_dir, meta, loaded.hidden_dim)
        stored = cache.load()
        report.n_corrupt_chunks = cache.n_corrupt
        vectors = {k: stored[k] for k in first if k in stored}
        report.n_cached = sum(1 for k in keys if k in vectors)

    todo = [k for k in first if k not in vectors]
    if todo:
        runner = _runner(loaded, config.layer, pooling)
        token_ids, report.n_truncated = tok.encode(
            [texts[first[k]] for k in todo], config.max_length, config.truncation_side, add_special_tokens=not chat
        )
        lengths = [len(t) for t in token_ids]
        vocab = int(loaded.model.config.vocab_size)
        for j, n in enumerate(lengths):
            if n == 0:
                raise SotjaxInputError(f"text {first[todo[j]]} has no tokens after tokenisation")
            if max(token_ids[j]) >= vocab:  # an embedding lookup would silently clamp it
                raise SotjaxInputError(
                    f"{loaded.path}: the tokenizer gives token id {max(token_ids[j])} for text {first[todo[j]]} but "
                    f"the model has only {vocab} token embeddings (tokenizer and weights do not match)")
        report.tokens = int(sum(lengths))
        bar = tqdm(total=len(todo), unit="text", disable=not progress, file=sys.stderr, desc="embedding")
        try:
            for idx, rows, seq in plan_batches(lengths, config.batch_size, config.max_length, runner.n_devices):
                ids = np.zeros((rows, seq), dtype=np.int32)
                lens = np.ones((rows,), dtype=np.int32)  # padding rows: one token, discarded
                for r, i in enumerate(idx):
                    ids[r, : lengths[i]] = token_ids[i]
                    lens[r] = lengths[i]
                t0 = time.perf_counter()
                out, compile_s = runner(ids, lens)
                if compile_s:
                    report.compile_seconds += compile_s
                    report.shapes_compiled.append((rows, seq))
                report.compute_seconds += time.perf_counter() - t0 - compile_s
                report.padded_tokens += rows * seq
                batch_keys = [todo[i] for i in idx]
                for r, k in enumerate(batch_keys):
                    vectors[k] = out[r]
                if cache is not None:
                    cache.add(batch_keys, out[: len(idx)])
                report.n_computed += len(idx)
                bar.update(len(idx))
        except BaseException:
            bar.close()
            if cache is not None:  # keep what was computed for a re-run, but report the first error
                with contextlib.suppress(Exception):
                    cache.flush()
            raise
        bar.close()
        if cache is not None:
            cache.flush()
    emb = np.stack([vectors[k] for k in keys]).astype(np.float32, copy=False)
    report.seconds = time.perf_counter() - t_start
    if progress:
        print(f"sotjax: {report.summary()}", file=sys.stderr)
    return emb, report


def embed_texts(
    prompts: Sequence[str],
    responses: Sequence[str] | None = None,
    config: FeatureConfig | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Embed texts (``responses=None``) or (prompt, response) pairs; returns float32 (n, d).

    Pairs are rendered with ``config.template``; then each text is tokenised (truncated to
    ``config.max_length``) and passed through ``config.model``. Decoders give the hidden state at the
    last real token, encoders the L2-normalised mean over tokens (see the module docstring).
    Identical texts are computed once; with ``config.cache_dir`` vectors are cached on disk.
    Bad input raises :class:`sotjax.errors.SotjaxInputError`.
    """
    emb, _ = embed_texts_report(prompts, responses, config, progress)
    return emb
