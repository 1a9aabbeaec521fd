"""Stage 2 exports: PEFT adapter and merged checkpoint reload to the same logits (sotjax; transformers/peft
with torch when present), and the weighted-rows export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from sotjax.finetune.causal_lm import load_causal_lm, random_causal_lm
from sotjax.finetune.export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    export_rows,
    read_adapter,
    write_adapter,
    write_merged,
)
from sotjax.finetune.lora import LoRAConfig, apply_lora, lora_modules, set_lora_arrays
from sotjax.models.llama import LlamaConfig

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_llama"
TINY = LlamaConfig(vocab_size=320, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   rope_theta=10000.0, rms_norm_eps=1e-5)
LORA = LoRAConfig(rank=2, alpha=4, targets=("q_proj", "v_proj", "up_proj"))
IDS = jnp.asarray([[1, 17, 42, 99, 5, 0], [3, 4, 5, 6, 0, 0]])
MASK = jnp.asarray([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])


def _trained_model(tied: bool = False):
    model = random_causal_lm(TINY, seed=11, tied=tied)
    apply_lora(model, LORA, seed=1)
    rng = np.random.default_rng(5)
    for m in lora_modules(model).values():  # as if trained: B ≠ 0
        m.lora_b[...] = jnp.asarray(rng.normal(0, 0.2, m.lora_b[...].shape), jnp.float32)
    return model


def _base_dir(tmp_path: Path, tied: bool = False) -> Path:
    """A tiny HF checkpoint (with the fixture's tokenizer) to start from."""
    from sotjax.models.tokenizer import tokenizer_from_directory

    base = tmp_path / "base"
    write_merged(random_causal_lm(TINY, seed=11, tied=tied), base, tokenizer=tokenizer_from_directory(FIXTURE),
                 tokenizer_source=FIXTURE)
    return base


@pytest.mark.parametrize("tied", [False, True])
def test_merged_checkpoint_reloads_to_the_same_logits(tmp_path, tied):
    model = _trained_model(tied)
    expected = np.asarray(model(IDS, MASK))
    base = _base_dir(tmp_path, tied)
    loaded_base = load_causal_lm(base)
    write_merged(model, tmp_path / "merged", base_config=loaded_base.hf_config, tokenizer=loaded_base.tokenizer,
                 tokenizer_source=base)
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is tied
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    reloaded = load_causal_lm(tmp_path / "merged")
    assert reloaded.model.tied is tied
    np.testing.assert_allclose(np.asarray(reloaded.model(IDS, MASK)), expected, atol=3e-5)


def test_adapter_reloads_to_the_same_logits(tmp_path):
    model = _trained_model()
    expected = np.asarray(model(IDS, MASK))
    write_adapter(model, LORA, tmp_path / "adapter", base_model="base")
    cfg = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 2
    assert cfg["lora_alpha"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj", "up_proj"]
    from safetensors.numpy import load_file

    tensors = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    assert tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (2, 16)  # (r, in)
    assert tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (8, 2)  # (out, r)
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].shape == (32, 2)
    assert len(tensors) == 2 * 3 * TINY.num_layers
    config, arrays = read_adapter(tmp_path / "adapter", TINY.num_layers)
    fresh = random_causal_lm(TINY, seed=11)
    apply_lora(fresh, config, seed=99)
    set_lora_arrays(fresh, arrays)
    np.testing.assert_array_equal(np.asarray(fresh(IDS, MASK)), expected)


@pytest.mark.torch
def test_exports_match_transformers_and_peft(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = _trained_model()
    expected = np.asarray(model(IDS, MASK))
    base = _base_dir(tmp_path)
    loaded_base = load_causal_lm(base)
    write_merged(model, tmp_path / "merged", base_config=loaded_base.hf_config, tokenizer=loaded_base.tokenizer,
                 tokenizer_source=base)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(np.asarray(IDS)), attention_mask=torch.tensor(np.asarray(MASK))).logits
    valid = np.asarray(MASK).astype(bool)
    np.testing.assert_allclose(out.numpy()[valid], expected[valid], atol=1e-4)
    peft = pytest.importorskip("peft")
    write_adapter(model, LORA, tmp_path / "adapter", base_model=str(base))
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        out = adapted(input_ids=torch.tensor(np.asarray(IDS)), attention_mask=torch.tensor(np.asarray(MASK))).logits
    np.testing.assert_allclose(out.numpy()[valid], expected[valid], atol=1e-4)


def test_bare_llama_model_without_head_is_refused():
    from sotjax.errors import SotjaxInputError

    with pytest.raises(SotjaxInputError, match="no 'lm_head.weight'"):
        load_causal_lm(FIXTURE)


def test_export_rows_input_order_and_ranked(tmp_path):
    import pyarrow.parquet as pq

    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"id": i, "prompt": f"p{i}", "response": f"r{i}", "extra": k}) + "\n"
                            for k, i in enumerate("abcd")))
    run = SimpleNamespace(path=tmp_path, ids=tuple("abcd"), selected=np.array([True, False, True, True]),
                          train_weight=np.array([0.5, 0, 1.5, 1.0]), weights=np.full(4, 0.25))
    assert export_rows(run, data, tmp_path / "out.jsonl") == 3
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "c", "d"] and rows[1] == {"id": "c", "prompt": "pc", "response": "rc",
                                                                     "extra": 2, "weight": 1.5}
    export_rows(run, data, tmp_path / "out.parquet", ranked=True)
    table = pq.read_table(tmp_path / "out.parquet").to_pydict()
    assert table["id"] == ["c", "d", "a"] and table["weight"] == [1.5, 1.0, 0.5]
    shutil.rmtree(tmp_path / "out.parquet", ignore_errors=True)
