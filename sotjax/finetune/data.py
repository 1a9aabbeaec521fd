"""Training rows for Stage 2: a run's Top-K and ``train_weight`` joined by id with the corpus texts.

Joining. The run directory (:func:`sotjax.rundir.read_run`) names every corpus row by id; the
corpus file (``--data``, any format :func:`sotjax.features.records.read_text_records` reads, with
``prompt``/``response``/``id`` fields by default) holds the texts. The two must describe the same
rows: an id of the run that the data lacks, or a data row the run did not weigh, is one
:class:`SotjaxInputError` line (the wrong corpus, or a run of another corpus).

Which rows and which weights (the paper's ablations are one flag away):

==============================  ==================  =============================================
flags                           rows                per-row weight ``t_i`` (mean 1 over the rows)
==============================  ==================  =============================================
(default: SOT, Top-K + weights)  ``selected``        ``train_weight``
``--no-weights``                ``selected``        1 (Top-K only)
``--all-rows``                  every row           ``n · weight`` (reweighting without Top-K)
``--all-rows --no-weights``     every row           1 (plain SFT on everything)
==============================  ==================  =============================================

Rendering and masking. Each pair is rendered as the model will be prompted: with the model's chat
template (``template="chat"``, default when the tokenizer has one) applied to a user/assistant
exchange, or ``"Human: {prompt}\\nAssistant: {response}"`` followed by the EOS token
(``"human_assistant"``). The rendered text is split at the start of the response into a prompt
part (masked) and a response part (response + end-of-turn markup, predicted); both parts are
tokenised separately and concatenated, so the boundary is exact. A sequence longer than
``max_len`` keeps up to half of ``max_len`` of the prompt's *last* tokens and as much of the
response's beginning as fits (counted as truncated).

Batches. Rows are shuffled per epoch by a generator seeded with ``(seed, epoch)``, grouped into
windows of :data:`BUCKET_WINDOW` batches, sorted by length inside a window (length bucketing: less
padding), cut into batches and the batch order shuffled again; so the order is a pure function of
``(seed, epoch)`` and a resumed run sees the same batches. Batches are padded to a multiple of
:data:`PAD_MULTIPLE` tokens (capped at ``max_len``) to bound the number of compiled shapes; a short
last batch is filled with padding rows (``valid = 0``, weight 0).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sotjax.errors import SotjaxInputError, shorten

TEMPLATES = ("chat", "human_assistant")
BUCKET_WINDOW = 32
PAD_MULTIPLE = 16
_SENTINEL = "\ue000sotjax-response\ue001"


@dataclass
class TrainingRows:
    """The rows to train on, in run (input) order, with their weights ``t_i``."""

    ids: list[str]
    prompts: list[str]
    responses: list[str]
    weights: np.ndarray  # float64, mean 1 over the rows
    mode: str  # "topk+weights", "topk", "all+weights", "all"


@dataclass
class Encoded:
    """Token ids per row and the number of prompt tokens (masked) at their start."""

    tokens: list[np.ndarray]  # int32
    n_prompt: np.ndarray  # int64
    weights: np.ndarray  # float32
    n_truncated: int

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(t) for t in self.tokens], np.int64)

    @property
    def n_response_tokens(self) -> int:
        return int(sum(len(t) - int(p) for t, p in zip(self.tokens, self.n_prompt, strict=True)))


def training_rows(run: Any, data: str | os.PathLike, *, use_weights: bool = True, all_rows: bool = False,
                  prompt_field: str = "prompt", response_field: str = "response", id_field: str = "id",
                  split: str | None = None) -> TrainingRows:
    """Join ``run`` (a :class:`~sotjax.rundir.RunDir`) with the texts of ``data`` (see the module docstring)."""
    from sotjax.features.records import read_text_records

    records = read_text_records(data, prompt_field, response_field, id_field, text_field=prompt_field,
                                split=split)
    if records.responses is None:  # pragma: no cover - the text field never exists
        raise SotjaxInputError(f"{data}: field '{response_field}' is missing")
    index = {i: k for k, i in enumerate(records.ids)}
    missing = [i for i in run.ids if i not in index]
    if missing:
        raise SotjaxInputError(f"--data {data}: {len(missing)} of the run's {len(run.ids)} ids are not in the data "
                               f"(first: {shorten(missing[0])}); give the corpus the run weighed")
    run_ids = set(run.ids)
    extra = [i for i in records.ids if i not in run_ids]
    if extra:
        raise SotjaxInputError(f"--data {data}: {len(extra)} rows are not in the run {run.path} "
                               f"(first id: {shorten(extra[0])}); give the corpus the run weighed")
    n = len(run.ids)
    if all_rows:
        rows = np.arange(n)
        weights = np.asarray(run.weights, np.float64) * n if use_weights else np.ones(n)
    else:
        if run.selected is None:
            raise SotjaxInputError(f"{run.path}: weights.parquet has no 'selected' column (no Top-K); "
                                   "use --all-rows")
        rows = np.flatnonzero(run.selected)
        if rows.size == 0:
            raise SotjaxInputError(f"{run.path}: the run keeps no rows (selected is all false)")
        if not use_weights:
            weights = np.ones(rows.size)
        elif run.train_weight is not None:
            weights = np.asarray(run.train_weight, np.float64)[rows]
        else:
            w = np.asarray(run.weights, np.float64)[rows]
            weights = w * rows.size / w.sum()
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or not weights.sum() > 0:
        raise SotjaxInputError(f"{run.path}: training weights must be finite, non-negative and not all zero")
    mode = ("all" if all_rows else "topk") + ("+weights" if use_weights else "")
    ids = [run.ids[k] for k in rows]
    return TrainingRows(ids=ids, prompts=[records.prompts[index[i]] for i in ids],
                        responses=[records.responses[index[i]] for i in ids], weights=weights, mode=mode)


def split_rendered(tokenizer: Any, prompt: str, response: str, template: str,
                   compiled: Any = None) -> tuple[str, str, bool]:
    """``(prompt part, response part, add_special_tokens)`` of one pair (see the module docstring)."""
    if template == "human_assistant":
        eos = tokenizer.eos_token or ""
        return f"Human: {prompt}\nAssistant:", f" {response}{eos}", True
    rendered = compiled.render([{"role": "user", "content": prompt}, {"role": "assistant", "content": _SENTINEL}],
                               tokenizer.bos_token, tokenizer.eos_token)
    if rendered.count(_SENTINEL) != 1:
        raise SotjaxInputError(f"{tokenizer.source}: the chat template does not render the assistant's message "
                               "verbatim once; use --template human_assistant")
    head, tail = rendered.split(_SENTINEL)
    return head, response + tail, False


def encode_rows(tokenizer: Any, rows: TrainingRows, max_len: int, template: str | None = None) -> Encoded:
    """Tokenise every row into prompt + response ids (the prompt masked), truncated to ``max_len``."""
    if template is None:
        template = "chat" if tokenizer.chat_template else "human_assistant"
    if template not in TEMPLATES:
        raise SotjaxInputError(f"--template {shorten(template)} is not one of {', '.join(TEMPLATES)}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 4 <= max_len <= 1 << 17:
        raise SotjaxInputError(f"--max-len must be an integer in [4, {1 << 17}], got {shorten(max_len)}")
    compiled = None
    if template == "chat":
        from sotjax.features.templates import ChatTemplate

        if not tokenizer.chat_template:
            raise SotjaxInputError("--template chat: the model has no chat template (use human_assistant)")
        compiled = ChatTemplate(tokenizer.chat_template, tokenizer.source)
    heads, tails, special = [], [], False
    for p, r in zip(rows.prompts, rows.responses, strict=True):
        head, tail, special = split_rendered(tokenizer, p, r, template, compiled)
        heads.append(head)
        tails.append(tail)
    big = 1 << 20
    head_ids, _ = tokenizer.encode(heads, big, add_special_tokens=special)
    tail_ids, _ = tokenizer.encode(tails, big, add_special_tokens=False)
    tokens, n_prompt, truncated = [], [], 0
    for h, t in zip(head_ids, tail_ids, strict=True):
        if len(h) + len(t) > max_len:
            truncated += 1
            keep_h = min(len(h), max(max_len // 2, max_len - len(t)))
            h = h[len(h) - keep_h:]
            t = t[: max_len - keep_h]
        tokens.append(np.asarray(list(h) + list(t), np.int32))
        n_prompt.append(len(h))
    empty = [rows.ids[k] for k, (tok, p) in enumerate(zip(tokens, n_prompt, strict=True)) if len(tok) - p < 1]
    if empty:
        raise SotjaxInputError(f"row {shorten(empty[0])}: the response has no tokens ({len(empty)} such rows)")
    return Encoded(tokens, np.asarray(n_prompt, np.int64), np.asarray(rows.weights, np.float32), truncated)


def epoch_batches(lengths: Sequence[int] | np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Row indices of each batch of ``epoch`` (a pure function of ``(seed, epoch)``; see the module docstring)."""
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)])
    order = rng.permutation(lengths.size)
    window = batch_size * BUCKET_WINDOW
    batches: list[np.ndarray] = []
    for start in range(0, order.size, window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, chunk.size, batch_size))
    perm = rng.permutation(len(batches))
    return [batches[k] for k in perm]


def padded_length(n: int, max_len: int) -> int:
    """``n`` rounded up to a multiple of :data:`PAD_MULTIPLE`, at most ``max_len``."""
    return min(max_len, -(-n // PAD_MULTIPLE) * PAD_MULTIPLE)


def make_batch(enc: Encoded, rows: np.ndarray, batch_size: int, max_len: int) -> dict[str, np.ndarray]:
    """Right-padded numpy arrays: ``input_ids``, ``attention_mask``, ``loss_mask``, ``weight``, ``valid``."""
    s = padded_length(int(max(len(enc.tokens[r]) for r in rows)), max_len)
    ids = np.zeros((batch_size, s), np.int32)
    attn = np.zeros((batch_size, s), np.int32)
    loss = np.zeros((batch_size, s), np.int32)
    weight = np.zeros((batch_size,), np.float32)
    valid = np.zeros((batch_size,), np.float32)
    for k, r in enumerate(rows):
        tok = enc.tokens[r]
        ids[k, : len(tok)] = tok
        attn[k, : len(tok)] = 1
        loss[k, int(enc.n_prompt[r]): len(tok)] = 1
        weight[k] = enc.weights[r]
        valid[k] = 1.0
    for k in range(len(rows), batch_size):  # padding rows: one real-looking token so attention has a key
        attn[k, 0] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss, "weight": weight, "valid": valid}
