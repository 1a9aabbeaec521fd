"""Exports of a fine-tune: the PEFT adapter, the merged checkpoint, and weighted rows for other trainers.

``adapter/`` (PEFT's LoRA layout, loadable with ``peft.PeftModel.from_pretrained``):

* ``adapter_model.safetensors``: for block ``i`` and each target ``<group>.<proj>``
  (``self_attn.q_proj`` ...), ``base_model.model.model.layers.<i>.<group>.<proj>.lora_A.weight``
  (r, in) = ``A[i]ᵀ`` and ``...lora_B.weight`` (out, r) = ``B[i]ᵀ`` (torch layout: ``y = x Aᵀ Bᵀ``);
* ``adapter_config.json``: ``peft_type: LORA``, ``task_type: CAUSAL_LM``, ``r``, ``lora_alpha``,
  ``lora_dropout``, ``target_modules``, ``bias: none``, ``base_model_name_or_path``.

``merged/`` (a Hugging Face ``LlamaForCausalLM`` checkpoint): ``model.safetensors`` with HF names
(``model.embed_tokens.weight``, ``model.layers.<i>.self_attn.q_proj.weight`` (out, in), ...,
``model.norm.weight``, ``lm_head.weight`` unless the embedding is tied), ``config.json`` (the base
checkpoint's, updated; or one built from the :class:`~sotjax.models.llama.LlamaConfig` for a GGUF
base) and the tokenizer files (copied from a checkpoint directory, or ``tokenizer.json`` +
``tokenizer_config.json`` with the chat template rebuilt from a GGUF file).

:func:`export_rows`: the kept rows of a run with a ``weight`` column (``train_weight``), as JSONL or
Parquet, in input order or ranked (highest weight first).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from sotjax import rundir
from sotjax.errors import SotjaxInputError, shorten
from sotjax.finetune.lora import TARGETS, LoRAConfig, lora_arrays, merge_lora

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MERGED_WEIGHTS = "model.safetensors"
PEFT_PREFIX = "base_model.model.model.layers"
#: the tokenizer files a merged checkpoint may hold (owned by the run-directory schema)
TOKENIZER_FILES = rundir.TOKENIZER_FILES


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)


def adapter_tensors(model: Any) -> dict[str, np.ndarray]:
    """PEFT-named adapter tensors (float32) of a model with LoRA adapters."""
    out: dict[str, np.ndarray] = {}
    for name, (a, b) in lora_arrays(model).items():
        group, attr = TARGETS[name]
        for i in range(a.shape[0]):
            stem = f"{PEFT_PREFIX}.{i}.{group}.{attr}"
            out[f"{stem}.lora_A.weight"] = a[i].T.copy()
            out[f"{stem}.lora_B.weight"] = b[i].T.copy()
    return out


def write_adapter(model: Any, config: LoRAConfig, directory: Path, base_model: str) -> None:
    """``adapter_model.safetensors`` + ``adapter_config.json`` into ``directory`` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    _save_safetensors(adapter_tensors(model), directory / ADAPTER_WEIGHTS, {"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
           "lora_dropout": config.dropout, "target_modules": list(config.targets), "bias": "none",
           "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
           "base_model_name_or_path": base_model, "modules_to_save": None, "use_rslora": False, "use_dora": False}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def read_adapter(directory: str | os.PathLike, num_layers: int) -> tuple[LoRAConfig, dict[str, tuple[np.ndarray,
                                                                                                    np.ndarray]]]:
    """Read a PEFT LoRA adapter (this module's layout) back into ``LoRAConfig`` and stacked (A, B) arrays."""
    from sotjax.io import read_json_file
    from sotjax.models.safetensors_loader import SafetensorsFile

    directory = Path(directory)
    cfg = read_json_file(directory / ADAPTER_CONFIG, 1 << 20, ADAPTER_CONFIG)
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise SotjaxInputError(f"{directory / ADAPTER_CONFIG}: field 'peft_type' must be 'LORA'")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list):
        raise SotjaxInputError(f"{directory / ADAPTER_CONFIG}: field 'target_modules' must be a list")
    config = LoRAConfig(rank=cfg.get("r"), alpha=cfg.get("lora_alpha"), targets=tuple(targets),  # type: ignore[arg-type]
                        dropout=cfg.get("lora_dropout", 0.0) or 0.0)
    f = SafetensorsFile(directory / ADAPTER_WEIGHTS)
    arrays = {}
    for name in config.targets:
        group, attr = TARGETS[name]
        a = [f.get(f"{PEFT_PREFIX}.{i}.{group}.{attr}.lora_A.weight").T for i in range(num_layers)]
        b = [f.get(f"{PEFT_PREFIX}.{i}.{group}.{attr}.lora_B.weight").T for i in range(num_layers)]
        arrays[name] = (np.stack(a), np.stack(b))
    return config, arrays


def hf_tensors(model: Any) -> dict[str, np.ndarray]:
    """Hugging Face ``LlamaForCausalLM`` tensors (float32, torch layout) of a :class:`CausalLM` without adapters."""
    from sotjax.finetune.lora import lora_modules

    if lora_modules(model):
        raise ValueError("merge the adapters first (merge_lora)")
    pure = nnx.to_pure_dict(nnx.state(model.model, nnx.Param))
    out: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": np.asarray(pure["embed_tokens"]["embedding"], np.float32),
        "model.norm.weight": np.asarray(pure["norm"]["weight"], np.float32),
    }
    layers = pure["layers"]
    n = model.config.num_layers
    for i in range(n):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"model.layers.{i}.{norm}.weight"] = np.asarray(layers[norm]["weight"][i], np.float32)
        for group, attr in TARGETS.values():
            linear = layers[group][attr]
            out[f"model.layers.{i}.{group}.{attr}.weight"] = np.asarray(linear["kernel"][i], np.float32).T.copy()
            if "bias" in linear:
                out[f"model.layers.{i}.{group}.{attr}.bias"] = np.asarray(linear["bias"][i], np.float32)
    if not model.tied:
        out["lm_head.weight"] = np.asarray(model.lm_head[...], np.float32)
    return out


def hf_config(model: Any, base: dict[str, Any] | None, dtype: str, bos_id: int | None = None,
              eos_id: int | None = None) -> dict[str, Any]:
    """``config.json`` for the merged checkpoint (the base's, with the architecture fields re-stated)."""
    c = model.config
    cfg: dict[str, Any] = dict(base or {})
    cfg.setdefault("model_type", "llama")
    cfg.update({
        "architectures": ["Qwen2ForCausalLM" if cfg["model_type"] == "qwen2" else "LlamaForCausalLM"],
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps,
        "hidden_act": "silu", "tie_word_embeddings": bool(model.tied), "torch_dtype": dtype,
        "attention_bias": c.attention_bias, "mlp_bias": c.mlp_bias,
    })
    if base is None:
        cfg.update({"rope_theta": c.rope_theta, "max_position_embeddings": 8192, "use_cache": True})
        if c.rope_freq_factors is not None:
            cfg["sotjax_note"] = ("the GGUF base uses per-frequency RoPE factors that this config does not restate; "
                                  "copy rope_scaling from the original checkpoint")
        if bos_id is not None:
            cfg["bos_token_id"] = bos_id
        if eos_id is not None:
            cfg["eos_token_id"] = eos_id
    cfg.pop("dtype", None)
    return cfg


def _token_id(tokenizer: Any, token: str | None) -> int | None:
    if token is None:
        return None
    try:
        idx = tokenizer.tokenizer.token_to_id(token)
    except Exception:
        return None
    return None if idx is None else int(idx)


def write_tokenizer(tokenizer: Any, source: Path, directory: Path) -> list[str]:
    """Copy the tokenizer files of a checkpoint directory, or rebuild them for a GGUF model."""
    written = []
    if source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, directory / name)
                written.append(name)
        return written
    (directory / "tokenizer.json").write_text(tokenizer.tokenizer.to_str(), encoding="utf-8")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.bos_token,
           "eos_token": tokenizer.eos_token, "chat_template": tokenizer.chat_template,
           "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return ["tokenizer.json", "tokenizer_config.json"]


def write_merged(model: Any, directory: Path, *, base_config: dict[str, Any] | None = None, dtype: str = "float32",
                 tokenizer: Any = None, tokenizer_source: Path | None = None) -> None:
    """Merge the adapters (if any) and write an HF checkpoint into ``directory`` (created)."""
    import ml_dtypes

    from sotjax.finetune.lora import lora_modules

    directory.mkdir(parents=True, exist_ok=True)
    merged = merge_lora(model) if lora_modules(model) else model
    tensors = hf_tensors(merged)
    if dtype == "bfloat16":
        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    _save_safetensors(tensors, directory / MERGED_WEIGHTS, {"format": "pt"})
    bos = _token_id(tokenizer, tokenizer.bos_token) if tokenizer is not None else None
    eos = _token_id(tokenizer, tokenizer.eos_token) if tokenizer is not None else None
    cfg = hf_config(merged, base_config, dtype, bos, eos)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None and tokenizer_source is not None:
        write_tokenizer(tokenizer, tokenizer_source, directory)


# ----------------------------------------------------------------------------------- weighted rows
EXPORT_SUFFIXES = (".jsonl", ".parquet")


def export_rows(run: Any, data: str | os.PathLike, out: str | os.PathLike, *, ranked: bool = False,
                prompt_field: str = "prompt", response_field: str = "response", id_field: str = "id",
                split: str | None = None) -> int:
    """Write the run's kept rows of ``data`` (every field) plus ``weight`` (= ``train_weight``); returns the count.

    Order: input order, or ``ranked`` (highest weight first, ties in input order). The file is
    written atomically; the data must hold exactly the run's ids (one line otherwise).
    """
    from sotjax.atomic import atomic_path
    from sotjax.features.records import read_rows
    from sotjax.finetune.data import training_rows

    out = Path(out)
    if out.suffix.lower() not in EXPORT_SUFFIXES:
        raise SotjaxInputError(f"--out {out}: choose a .jsonl or .parquet file name")
    rows = training_rows(run, data, prompt_field=prompt_field, response_field=response_field, id_field=id_field,
                         split=split)
    weight = dict(zip(rows.ids, rows.weights.tolist(), strict=True))
    raw = read_rows(data, split)
    if "weight" in set().union(*(r.keys() for r in raw)):
        raise SotjaxInputError(f"--data {data}: already has a field 'weight'; rename it before exporting")
    keyed = {str(r.get(id_field)): r for r in raw} if id_field in raw[0] else {str(i): r for i, r in enumerate(raw)}
    order = list(rows.ids)
    if ranked:
        position = {i: k for k, i in enumerate(order)}
        order.sort(key=lambda i: (-weight[i], position[i]))
    records = [{**keyed[i], "weight": float(weight[i])} for i in order]
    with atomic_path(out) as tmp:
        if out.suffix.lower() == ".jsonl":
            with open(tmp, "w", encoding="utf-8") as fh:
                for r in records:
                    fh.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                table = pa.Table.from_pylist(records)
            except (pa.ArrowException, ValueError, TypeError) as err:
                raise SotjaxInputError(f"--data {data}: its rows do not fit one Parquet schema "
                                       f"({shorten(str(err), 120)}); export to .jsonl") from None
            pq.write_table(table, tmp)
    return len(records)
