"""Text generation from a :class:`~sotjax.finetune.causal_lm.CausalLM` with a preallocated KV cache.

Prompts are rendered as the fine-tuned model saw them in training (:mod:`sotjax.finetune.data`): with
the model's chat template, the text before the assistant's message (for ChatML that is the
generation prompt ``<|im_start|>assistant\\n``), or ``"Human: {prompt}\\nAssistant:"`` when the
tokenizer has no template; ``chat_template=False`` tokenises the prompt as given.

Batches. Prompts are **left**-padded to one length ``P`` (the longest prompt of the call rounded up
to :data:`PROMPT_PAD_MULTIPLE`), so every row's next token sits in the same cache slot. Row ``r``
with ``n_r`` real tokens has ``P − n_r`` padding slots that no query attends to, and its tokens get
RoPE positions ``0 .. n_r − 1`` and then ``n_r, n_r + 1, …``: exactly the positions it has when
generated alone. The cache holds ``T = P + max_new_tokens`` slots per layer (keys already rotated), so
the shapes are fixed for the whole call: one compiled prefill and one compiled decode step, whatever
the batch (a short last batch is filled with inactive rows).

Decoding. A jitted prefill runs the prompt through the model once and writes its keys/values; then
each step feeds the last token (one query against the cache) and picks the next:

* ``temperature == 0``: greedy, ``argmax`` of the logits;
* ``temperature > 0``: a draw from ``softmax(logits / temperature)``, restricted to the nucleus
  (the smallest set of most likely tokens whose probability reaches ``top_p``) when ``top_p`` is
  given. Row ``r`` (its index in the call) at step ``i`` uses the key
  ``fold_in(fold_in(PRNGKey(seed), r), i)``, so a row's sample depends on the seed and its own
  prompt, not on the batch it shares.

A row stops after emitting one of the stop ids (:func:`stop_token_ids`: the tokenizer's EOS, the
checkpoint's ``eos_token_id``\\ s and the chat template's end-of-turn token); the loop ends when every
row has stopped or after ``max_new_tokens`` tokens. The loop is a ``jax.lax.while_loop`` inside one
jitted function (``loop="while"``, default) or a Python loop over a jitted, cache-donating step
(``loop="python"``); on the 2-core CPU the while loop was faster for tiny models (no per-token
dispatch and host sync) and the two were equal within noise for SmolLM2-135M.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sotjax.errors import SotjaxInputError, shorten
from sotjax.finetune.causal_lm import CausalLM

#: prompts are left-padded to a multiple of this many tokens (fewer compiled shapes)
PROMPT_PAD_MULTIPLE = 16
#: largest ``max_new_tokens`` accepted
MAX_NEW_TOKENS = 1 << 16
LOOPS = ("while", "python")
_EMPTY = -1  # output slot after a row stopped


# --------------------------------------------------------------------------------------------------
# prompts and stop tokens


def _template_kind(tokenizer: Any, chat_template: bool | str) -> str | None:
    """``"chat"``, ``"human_assistant"`` or None (raw prompt) from the ``chat_template`` argument."""
    from sotjax.finetune.data import TEMPLATES

    if chat_template is False:
        return None
    if chat_template is True:
        return "chat" if tokenizer.chat_template else "human_assistant"
    if chat_template not in TEMPLATES:
        raise SotjaxInputError(f"chat_template must be True, False or one of {', '.join(TEMPLATES)}, "
                               f"got {shorten(chat_template)}")
    if chat_template == "chat" and not tokenizer.chat_template:
        raise SotjaxInputError("chat_template='chat': the model has no chat template (use human_assistant)")
    return str(chat_template)


def _compiled_template(tokenizer: Any, kind: str | None) -> Any:
    if kind != "chat":
        return None
    from sotjax.features.templates import ChatTemplate

    return ChatTemplate(tokenizer.chat_template, tokenizer.source)


def render_prompts(tokenizer: Any, prompts: Sequence[str], chat_template: bool | str = True) -> list[list[int]]:
    """Token ids of each prompt as the model is prompted (see the module docstring)."""
    from sotjax.finetune.data import split_rendered

    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise SotjaxInputError("prompts must be a list of strings")
    kind = _template_kind(tokenizer, chat_template)
    compiled = _compiled_template(tokenizer, kind)
    if kind is None:
        texts, special = list(prompts), True
    else:
        texts, special = [], kind == "human_assistant"
        for p in prompts:
            head, _, special = split_rendered(tokenizer, p, "", kind, compiled)
            texts.append(head)
    ids, _ = tokenizer.encode(texts, 1 << 30, add_special_tokens=special)
    return [list(x) for x in ids]


def stop_token_ids(tokenizer: Any, hf_config: dict[str, Any] | None = None,
                   chat_template: bool | str = True) -> tuple[int, ...]:
    """Ids that end a row: the tokenizer's EOS token, ``eos_token_id`` (int or list) of ``hf_config``,
    and, with a chat template, the special token that closes the assistant's turn (``<|im_end|>``,
    ``<|eot_id|>``: the first token the template renders after the message). Sorted, unique."""
    from sotjax.finetune.data import split_rendered

    tok = tokenizer.tokenizer
    ids: set[int] = set()
    if tokenizer.eos_token:
        idx = tok.token_to_id(tokenizer.eos_token)
        if idx is not None:
            ids.add(int(idx))
    raw = (hf_config or {}).get("eos_token_id")
    for idx in raw if isinstance(raw, list) else [raw]:
        if isinstance(idx, int) and not isinstance(idx, bool) and idx >= 0:
            ids.add(idx)
    kind = _template_kind(tokenizer, chat_template)
    if kind == "chat":
        _, tail, _ = split_rendered(tokenizer, "x", "", kind, _compiled_template(tokenizer, kind))
        tail_ids, _ = tokenizer.encode([tail], 1 << 20, add_special_tokens=False)
        special = set(tok.get_added_tokens_decoder())
        if tail_ids[0] and tail_ids[0][0] in special:
            ids.add(int(tail_ids[0][0]))
    return tuple(sorted(ids))


# --------------------------------------------------------------------------------------------------
# the jitted pieces (pure functions of the model's graphdef/state)


def _logits(model: CausalLM, h: jax.Array) -> jax.Array:
    """Float32 logits (b, vocab) of final states ``h`` (b, d)."""
    w = model.head_weight()
    return jnp.einsum("bd,vd->bv", h, w.astype(h.dtype), preferred_element_type=jnp.float32)


def _nucleus(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits outside the top-``top_p`` nucleus set to −inf (the most likely token always stays)."""
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
    n_keep = jnp.maximum(jnp.sum(before < top_p, axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(ordered, n_keep - 1, axis=-1)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def _pick(logits: jax.Array, row_keys: jax.Array, step: jax.Array, temperature: jax.Array, top_p: jax.Array,
          sample: bool, use_top_p: bool) -> jax.Array:
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    if use_top_p:
        scaled = _nucleus(scaled, top_p)
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)


def _record(new: jax.Array, done: jax.Array, eos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The token to store (``_EMPTY`` for a stopped row) and the updated stop flags."""
    tok = jnp.where(done, _EMPTY, new)
    return tok, done | jnp.isin(new, eos)


def _prefill(model: CausalLM, ids: jax.Array, mask: jax.Array, max_new: int
             ) -> tuple[jax.Array, tuple[jax.Array, jax.Array], jax.Array]:
    b, p = ids.shape
    cache = model.model.init_cache(b, p + max_new)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    key_mask = jnp.concatenate([mask.astype(bool), jnp.ones((b, max_new), bool)], axis=1)
    h, cache = model.model.cached_hidden_states(ids, positions, key_mask, cache, 0)
    return _logits(model, h[:, -1]), cache, key_mask


def _decode(model: CausalLM, cache: tuple[jax.Array, jax.Array], key_mask: jax.Array, last: jax.Array,
            lengths: jax.Array, prompt_len: int, step: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Logits after feeding ``last`` (b,), the token generated at ``step − 1``, into slot ``P + step − 1``."""
    fed = jnp.where(last < 0, 0, last)[:, None]
    positions = (lengths + step - 1)[:, None]
    h, cache = model.model.cached_hidden_states(fed, positions, key_mask, cache, prompt_len + step - 1)
    return _logits(model, h[:, -1]), cache


@partial(jax.jit, static_argnames=("graphdef", "max_new", "sample", "use_top_p"))
def _generate_while(graphdef: Any, state: Any, ids: jax.Array, mask: jax.Array, active: jax.Array,
                    row_keys: jax.Array, eos: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
                    max_new: int, sample: bool, use_top_p: bool) -> tuple[jax.Array, jax.Array]:
    """Prefill + ``while_loop`` decode; returns tokens (b, max_new) (``_EMPTY`` after a stop) and steps run."""
    model = nnx.merge(graphdef, state)
    b, p = ids.shape
    lengths = jnp.sum(mask, axis=1).astype(jnp.int32)
    logits, cache, key_mask = _prefill(model, ids, mask, max_new)
    first = _pick(logits, row_keys, jnp.int32(0), temperature, top_p, sample, use_top_p)
    tok, done = _record(first, ~active, eos)
    out = jnp.full((b, max_new), _EMPTY, jnp.int32).at[:, 0].set(tok)

    def cond(carry: tuple[Any, ...]) -> jax.Array:
        step, _, done, _, _ = carry
        return (step < max_new) & ~jnp.all(done)

    def body(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        step, last, done, out, cache = carry
        logits, cache = _decode(model, cache, key_mask, last, lengths, p, step)
        tok, done = _record(_pick(logits, row_keys, step, temperature, top_p, sample, use_top_p), done, eos)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (jnp.int32(0), step))
        return step + 1, tok, done, out, cache

    steps, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tok, done, out, cache))
    return out, steps


@partial(jax.jit, static_argnames=("graphdef", "max_new", "sample", "use_top_p"))
def _prefill_step(graphdef: Any, state: Any, ids: jax.Array, mask: jax.Array, active: jax.Array,
                  row_keys: jax.Array, eos: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
                  max_new: int, sample: bool, use_top_p: bool) -> tuple[Any, ...]:
    model = nnx.merge(graphdef, state)
    logits, cache, key_mask = _prefill(model, ids, mask, max_new)
    first = _pick(logits, row_keys, jnp.int32(0), temperature, top_p, sample, use_top_p)
    tok, done = _record(first, ~active, eos)
    return tok, done, cache, key_mask


@partial(jax.jit, static_argnames=("graphdef", "prompt_len", "sample", "use_top_p"), donate_argnames=("cache",))
def _decode_step(graphdef: Any, state: Any, cache: tuple[jax.Array, jax.Array], key_mask: jax.Array,
                 last: jax.Array, done: jax.Array, lengths: jax.Array, step: jax.Array, row_keys: jax.Array,
                 eos: jax.Array, temperature: jax.Array, top_p: jax.Array, *, prompt_len: int, sample: bool,
                 use_top_p: bool) -> tuple[Any, ...]:
    model = nnx.merge(graphdef, state)
    logits, cache = _decode(model, cache, key_mask, last, lengths, prompt_len, step)
    tok, done = _record(_pick(logits, row_keys, step, temperature, top_p, sample, use_top_p), done, eos)
    return tok, done, cache


def _generate_python(graphdef: Any, state: Any, ids: jax.Array, mask: jax.Array, active: jax.Array,
                     row_keys: jax.Array, eos: jax.Array, temperature: jax.Array, top_p: jax.Array, *,
                     max_new: int, sample: bool, use_top_p: bool) -> tuple[jax.Array, jax.Array]:
    """Same result as :func:`_generate_while`, with the decode loop in Python (one jitted call per token)."""
    flags = dict(sample=sample, use_top_p=use_top_p)
    tok, done, cache, key_mask = _prefill_step(graphdef, state, ids, mask, active, row_keys, eos, temperature,
                                               top_p, max_new=max_new, **flags)
    lengths = jnp.sum(mask, axis=1).astype(jnp.int32)
    tokens = [tok]
    step = 1
    while step < max_new and not bool(jnp.all(done)):
        tok, done, cache = _decode_step(graphdef, state, cache, key_mask, tok, done, lengths, jnp.int32(step),
                                        row_keys, eos, temperature, top_p, prompt_len=ids.shape[1], **flags)
        tokens.append(tok)
        step += 1
    out = jnp.full((ids.shape[0], max_new), _EMPTY, jnp.int32).at[:, :step].set(jnp.stack(tokens, axis=1))
    return out, jnp.int32(step)


# --------------------------------------------------------------------------------------------------
# public API


def _check_args(max_new_tokens: Any, temperature: Any, top_p: Any, batch_size: Any, loop: str) -> None:
    def is_int(x: Any) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if not is_int(max_new_tokens) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise SotjaxInputError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}], "
                               f"got {shorten(max_new_tokens)}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating))
            or not np.isfinite(temperature) or temperature < 0):
        raise SotjaxInputError(f"temperature must be a finite number >= 0, got {shorten(temperature)}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating))
                              or not 0 < top_p <= 1):
        raise SotjaxInputError(f"top_p must be in (0, 1], got {shorten(top_p)}")
    if not is_int(batch_size) or batch_size < 1:
        raise SotjaxInputError(f"batch_size must be a positive integer, got {shorten(batch_size)}")
    if loop not in LOOPS:
        raise SotjaxInputError(f"loop must be one of {', '.join(LOOPS)}, got {shorten(loop)}")


def generate_ids(model: CausalLM, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float | None = None, seed: int = 0,
                 eos_ids: Sequence[int] = (), batch_size: int = 8, loop: str = "while") -> list[list[int]]:
    """New token ids per prompt: at most ``max_new_tokens``, ending with the stop id when one was emitted.

    ``prompt_ids`` are token ids (not padded, at least one per prompt); see the module docstring for
    padding, sampling and stopping. Bad arguments are one :class:`SotjaxInputError` line.
    """
    tokens, _ = _generate_ids(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, seed=seed, eos_ids=eos_ids, batch_size=batch_size, loop=loop)
    return tokens


def _generate_ids(model: CausalLM, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                  temperature: float, top_p: float | None, seed: int, eos_ids: Sequence[int], batch_size: int,
                  loop: str) -> tuple[list[list[int]], list[int]]:
    """:func:`generate_ids` plus the number of tokens each batch's loop ran (tests: early stop)."""
    _check_args(max_new_tokens, temperature, top_p, batch_size, loop)
    vocab = model.config.vocab_size
    rows = [np.asarray(p, np.int64).reshape(-1) for p in prompt_ids]
    for k, r in enumerate(rows):
        if r.size == 0:
            raise SotjaxInputError(f"prompt {k} has no tokens")
        if r.min() < 0 or r.max() >= vocab:
            raise SotjaxInputError(f"prompt {k} holds a token id outside [0, {vocab})")
    stops = sorted({int(e) for e in eos_ids})
    if stops and (stops[0] < 0 or stops[-1] >= vocab):
        raise SotjaxInputError(f"eos_ids must lie in [0, {vocab}), got {shorten(stops)}")
    eos = np.full(-(-max(len(stops), 1) // 8) * 8, _EMPTY, np.int32)  # padded: one shape for 1..8 stop ids
    eos[: len(stops)] = stops
    if not rows:
        return [], []
    n = len(rows)
    b = min(batch_size, n)
    p = -(-max(r.size for r in rows) // PROMPT_PAD_MULTIPLE) * PROMPT_PAD_MULTIPLE
    sample = temperature > 0
    use_top_p = sample and top_p is not None and top_p < 1
    graphdef, state = nnx.split(model)
    run = _generate_while if loop == "while" else _generate_python
    base = jax.random.PRNGKey(int(seed) & 0xFFFFFFFF)
    scalars = (jnp.asarray(eos), jnp.float32(temperature if sample else 1.0), jnp.float32(top_p or 1.0))
    results: list[list[int]] = []
    steps: list[int] = []
    for start in range(0, n, b):
        chunk = rows[start:start + b]
        ids = np.zeros((b, p), np.int32)
        mask = np.zeros((b, p), np.int32)
        for k, r in enumerate(chunk):
            ids[k, p - r.size:] = r
            mask[k, p - r.size:] = 1
        mask[len(chunk):, -1] = 1  # inactive filler rows: one token so attention has a key
        active = np.arange(b) < len(chunk)
        row_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.arange(start, start + b))
        out, ran = run(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(active), row_keys,
                       *scalars, max_new=max_new_tokens, sample=sample, use_top_p=use_top_p)
        out_np = np.asarray(out)
        steps.append(int(ran))
        for k in range(len(chunk)):
            row = out_np[k]
            row = row[: int(np.argmax(row == _EMPTY))] if (row == _EMPTY).any() else row
            results.append([int(t) for t in row])
    return results, steps


def generate(model: CausalLM, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float | None = None, seed: int = 0,
             eos_ids: Sequence[int] | None = None, chat_template: bool | str = True, batch_size: int = 8,
             hf_config: dict[str, Any] | None = None, loop: str = "while") -> list[str]:
    """The model's reply to each prompt (decoded, special tokens and the stop token removed).

    ``chat_template``: True (the model's template, else ``Human:/Assistant:``), ``"chat"``,
    ``"human_assistant"`` or False (the raw prompt). ``eos_ids`` defaults to
    :func:`stop_token_ids` (``hf_config`` is a checkpoint's ``config.json``, e.g.
    :attr:`LoadedCausalLM.hf_config`).
    """
    ids = render_prompts(tokenizer, prompts, chat_template)
    stops = stop_token_ids(tokenizer, hf_config, chat_template) if eos_ids is None else tuple(eos_ids)
    outs = generate_ids(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        seed=seed, eos_ids=stops, batch_size=batch_size, loop=loop)
    stop_set = set(stops)
    texts = []
    for row in outs:
        if row and row[-1] in stop_set:
            row = row[:-1]
        texts.append(tokenizer.tokenizer.decode(row, skip_special_tokens=True))
    return texts
