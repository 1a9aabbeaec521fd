"""A Llama decoder with its language-model head: ``logits = RMSNorm(h_L) · W_headᵀ`` (float32 logits).

:class:`~sotjax.models.llama.LlamaModel` (the feature model) carries no head, and its loaders skip
``lm_head``. :func:`load_causal_lm` loads the same decoder and adds the head: ``lm_head.weight``
(safetensors) or ``output.weight`` (GGUF) when the checkpoint has one, else the token embedding
(tied weights, as SmolLM2 does). A Hugging Face directory whose ``config.json`` says
``tie_word_embeddings: false`` but holds no ``lm_head.weight`` (a bare ``LlamaModel``) is refused
with one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sotjax.errors import SotjaxInputError
from sotjax.models.llama import LlamaConfig, LlamaModel


class CausalLM(nnx.Module):
    """``model`` (a :class:`LlamaModel`) plus an untied head ``lm_head`` (vocab, d) or a tied one (None)."""

    def __init__(self, model: LlamaModel, lm_head: Any | None = None):
        self.model = model
        self.config: LlamaConfig = model.config
        dtype = model.embed_tokens.embedding[...].dtype
        self.lm_head = None if lm_head is None else nnx.Param(jnp.asarray(lm_head, dtype=dtype))

    @property
    def tied(self) -> bool:
        return self.lm_head is None

    def head_weight(self) -> jax.Array:
        """The (vocab, d) output matrix (the embedding when tied)."""
        if self.lm_head is None:
            return self.model.embed_tokens.embedding[...]
        return self.lm_head[...]

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Logits (b, s, vocab) in float32 for right-padded ``input_ids`` (b, s)."""
        h = self.model.hidden_states(input_ids, attention_mask, -1)
        w = self.head_weight()
        return jnp.einsum("bsd,vd->bsv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)


def random_causal_lm(config: LlamaConfig, seed: int = 0, tied: bool = False,
                     dtype: jnp.dtype = jnp.float32) -> CausalLM:
    """A randomly initialised model (tests, examples): normal(0, 0.02)-scale weights from ``seed``."""
    model = LlamaModel(config, dtype=dtype, rngs=nnx.Rngs(seed))
    head = None
    if not tied:
        rng = np.random.default_rng(seed + 1)
        head = rng.normal(0, 0.02, (config.vocab_size, config.hidden_size)).astype(np.float32)
    return CausalLM(model, head)


@dataclass
class LoadedCausalLM:
    """A model ready to fine-tune: the nnx module, its tokenizer and where it came from."""

    model: CausalLM
    tokenizer: Any  # sotjax.models.tokenizer.TextTokenizer
    path: Path
    fingerprint: str
    hf_config: dict[str, Any] | None  # config.json of a checkpoint directory (None for GGUF)


def load_causal_lm(name_or_path: str | os.PathLike, dtype: str = "float32") -> LoadedCausalLM:
    """Load a Llama-family decoder with its head (builtin name, ``.gguf`` file or HF checkpoint directory)."""
    from sotjax.models.registry import COMPUTE_DTYPES, model_fingerprint, resolve_model_path

    if dtype not in COMPUTE_DTYPES:
        raise SotjaxInputError(f"--dtype {dtype!r} is not supported (choose {', '.join(COMPUTE_DTYPES)})")
    jdtype = COMPUTE_DTYPES[dtype]
    path = resolve_model_path(name_or_path).resolve()
    fingerprint = model_fingerprint(path)
    if path.is_file():
        from sotjax.models.gguf_loader import load_gguf_llama
        from sotjax.models.tokenizer import tokenizer_from_gguf

        model, f = load_gguf_llama(path, jdtype)
        head = f.tensor("output.weight") if "output.weight" in f.tensors else None
        tokenizer = tokenizer_from_gguf(f.metadata, path)
        return LoadedCausalLM(CausalLM(model, head), tokenizer, path, fingerprint, None)
    from sotjax.models.safetensors_loader import LLAMA_TYPES, Checkpoint, load_hf_checkpoint, read_config
    from sotjax.models.tokenizer import tokenizer_from_directory

    cfg = read_config(path)
    if cfg["model_type"] not in LLAMA_TYPES:
        raise SotjaxInputError(f"{path / 'config.json'}: model_type {cfg['model_type']!r} is not a decoder "
                               f"sotjax can fine-tune (supported: {', '.join(LLAMA_TYPES)})")
    loaded = load_hf_checkpoint(path, jdtype)
    assert isinstance(loaded, LlamaModel)
    ckpt = Checkpoint(path)
    names = set(ckpt.names())
    head = None
    if "lm_head.weight" in names:
        head = ckpt.get("lm_head.weight")
        if head.shape != (loaded.config.vocab_size, loaded.config.hidden_size):
            raise SotjaxInputError(f"{path}: tensor 'lm_head.weight' has shape {head.shape}, expected "
                                   f"{(loaded.config.vocab_size, loaded.config.hidden_size)}")
    elif cfg.get("tie_word_embeddings") is False:
        raise SotjaxInputError(f"{path}: no 'lm_head.weight' and config.json says tie_word_embeddings: false "
                               "(a bare LlamaModel without a language-model head cannot be fine-tuned)")
    tokenizer = tokenizer_from_directory(path)
    return LoadedCausalLM(CausalLM(loaded, head), tokenizer, path, fingerprint, cfg)
