"""Build an nnx model from Hugging Face-named tensors (the common target of both loaders).

A *tensor getter* maps a Hugging Face parameter name without the architecture prefix
(``layers.0.self_attn.q_proj.weight`` for Llama, ``encoder.layer.0.attention.self.query.weight``
for BERT) to a float32 numpy array in PyTorch layout (linear weights are (out, in)). Linear weights
are transposed to nnx's (in, out) kernels and per-layer tensors are stacked along a new leading axis.
Parameters are cast to ``dtype``; the nnx module is created abstractly (no random init).
A tensor of the wrong shape raises :class:`ValueError` naming it (the loaders turn it into one line).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sotjax.models.bert import BertConfig, BertModel
from sotjax.models.llama import LlamaConfig, LlamaModel

TensorGetter = Callable[[str], np.ndarray]


def _stack(get: TensorGetter, n_layers: int, template: str, transpose: bool = False) -> np.ndarray:
    arrays = [get(template.format(i)) for i in range(n_layers)]
    if transpose:
        arrays = [a.T for a in arrays]
    for i, a in enumerate(arrays[1:], start=1):
        if a.shape != arrays[0].shape:
            raise ValueError(f"tensor '{template.format(i)}' has shape {a.T.shape if transpose else a.shape}, "
                             f"but '{template.format(0)}' has {arrays[0].T.shape if transpose else arrays[0].shape}")
    return np.stack(arrays)


def _linear(get: TensorGetter, n: int, prefix: str, bias: bool) -> dict[str, np.ndarray]:
    out = {"kernel": _stack(get, n, prefix + ".weight", transpose=True)}
    if bias:
        out["bias"] = _stack(get, n, prefix + ".bias")
    return out


def _materialise(abstract: nnx.Module, pure: dict, dtype: jnp.dtype, what: str) -> nnx.Module:
    """Check shapes against the abstract module, cast, and merge into a concrete module."""
    graphdef, state = nnx.split(abstract)
    expected = nnx.to_pure_dict(state)

    def check(exp: dict, got: dict, path: str) -> None:
        if set(exp) != set(got):
            raise ValueError(f"{what}: parameter set mismatch at '{path}': expected {sorted(exp)}, got {sorted(got)}")
        for key, value in exp.items():
            if isinstance(value, dict):
                check(value, got[key], f"{path}.{key}" if path else str(key))
            elif tuple(value.shape) != tuple(got[key].shape):
                raise ValueError(f"{what}: '{path}.{key}' has shape {got[key].shape}, expected {tuple(value.shape)}")

    check(expected, pure, "")

    def cast(tree: dict) -> dict:
        return {k: cast(v) if isinstance(v, dict) else jnp.asarray(v, dtype=dtype) for k, v in tree.items()}

    nnx.replace_by_pure_dict(state, cast(pure))
    return nnx.merge(graphdef, state)


def llama_from_tensors(config: LlamaConfig, get: TensorGetter, dtype: jnp.dtype = jnp.float32) -> LlamaModel:
    """Assemble a :class:`LlamaModel` from HF ``LlamaModel`` names (``embed_tokens.weight``, ...)."""
    n = config.num_layers
    attn_bias = config.attention_bias
    mlp_bias = config.mlp_bias
    pure = {
        "embed_tokens": {"embedding": get("embed_tokens.weight")},
        "norm": {"weight": get("norm.weight")},
        "layers": {
            "input_layernorm": {"weight": _stack(get, n, "layers.{}.input_layernorm.weight")},
            "post_attention_layernorm": {"weight": _stack(get, n, "layers.{}.post_attention_layernorm.weight")},
            "self_attn": {
                "q_proj": _linear(get, n, "layers.{}.self_attn.q_proj", attn_bias),
                "k_proj": _linear(get, n, "layers.{}.self_attn.k_proj", attn_bias),
                "v_proj": _linear(get, n, "layers.{}.self_attn.v_proj", attn_bias),
                "o_proj": _linear(get, n, "layers.{}.self_attn.o_proj", False),
            },
            "mlp": {
                "gate_proj": _linear(get, n, "layers.{}.mlp.gate_proj", mlp_bias),
                "up_proj": _linear(get, n, "layers.{}.mlp.up_proj", mlp_bias),
                "down_proj": _linear(get, n, "layers.{}.mlp.down_proj", mlp_bias),
            },
        },
    }
    abstract = nnx.eval_shape(lambda: LlamaModel(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return cast(LlamaModel, _materialise(abstract, pure, dtype, "Llama weights"))


def bert_from_tensors(config: BertConfig, get: TensorGetter, dtype: jnp.dtype = jnp.float32) -> BertModel:
    """Assemble a :class:`BertModel` from HF ``BertModel`` names (``embeddings.word_embeddings.weight``, ...)."""
    n = config.num_layers

    def norm(prefix: str, stacked: bool) -> dict[str, np.ndarray]:
        if stacked:
            return {"scale": _stack(get, n, prefix + ".weight"), "bias": _stack(get, n, prefix + ".bias")}
        return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

    layer = "encoder.layer.{}."
    pure = {
        "word_embeddings": {"embedding": get("embeddings.word_embeddings.weight")},
        "position_embeddings": {"embedding": get("embeddings.position_embeddings.weight")},
        "token_type_embeddings": {"embedding": get("embeddings.token_type_embeddings.weight")},
        "embeddings_norm": norm("embeddings.LayerNorm", stacked=False),
        "layers": {
            "attention": {
                "query": _linear(get, n, layer + "attention.self.query", True),
                "key": _linear(get, n, layer + "attention.self.key", True),
                "value": _linear(get, n, layer + "attention.self.value", True),
                "output": _linear(get, n, layer + "attention.output.dense", True),
                "output_norm": norm(layer + "attention.output.LayerNorm", stacked=True),
            },
            "intermediate": _linear(get, n, layer + "intermediate.dense", True),
            "output": _linear(get, n, layer + "output.dense", True),
            "output_norm": norm(layer + "output.LayerNorm", stacked=True),
        },
    }
    abstract = nnx.eval_shape(lambda: BertModel(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return cast(BertModel, _materialise(abstract, pure, dtype, "BERT weights"))
