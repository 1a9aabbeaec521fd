"""Stage 2 trainer and data: deterministic bucketed batches, schedule, training lowers the loss,
checkpoint → kill → resume is bit-identical, run ⋈ corpus joining and its one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from sotjax.errors import SotjaxInputError
from sotjax.finetune.causal_lm import random_causal_lm
from sotjax.finetune.data import Encoded, encode_rows, epoch_batches, make_batch, training_rows
from sotjax.finetune.lora import LoRAConfig, apply_lora, lora_arrays
from sotjax.finetune.trainer import TrainConfig, read_checkpoint_meta, schedule, train
from sotjax.models.llama import LlamaConfig

TINY = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
FIXTURE = Path(__file__).parent / "fixtures" / "tiny_llama"


def _encoded(n: int = 10, seed: int = 0) -> Encoded:
    rng = np.random.default_rng(seed)
    tokens = [rng.integers(1, TINY.vocab_size, rng.integers(5, 20)).astype(np.int32) for _ in range(n)]
    n_prompt = np.asarray([rng.integers(1, len(t) - 1) for t in tokens])
    return Encoded(tokens, n_prompt, rng.uniform(0.2, 2.0, n).astype(np.float32), 0)


def _model(seed: int = 0):
    model = random_causal_lm(TINY, seed=seed)
    apply_lora(model, LoRAConfig(rank=2, alpha=4), seed=seed)
    return model


def test_epoch_order_is_deterministic_bucketed_and_complete():
    lengths = np.random.default_rng(0).integers(1, 100, 200)
    a = epoch_batches(lengths, 4, seed=3, epoch=0)
    assert [x.tolist() for x in a] == [x.tolist() for x in epoch_batches(lengths, 4, seed=3, epoch=0)]
    assert [x.tolist() for x in a] != [x.tolist() for x in epoch_batches(lengths, 4, seed=3, epoch=1)]
    assert sorted(np.concatenate(a).tolist()) == list(range(200))
    spread = np.mean([np.ptp(lengths[b]) for b in a])
    random_spread = np.mean([np.ptp(lengths[b]) for b in np.array_split(np.random.default_rng(1).permutation(200),
                                                                         50)])
    assert spread < random_spread / 3  # bucketing packs similar lengths together


def test_make_batch_masks_prompt_and_pads():
    enc = Encoded([np.array([5, 6, 7, 8], np.int32), np.array([9, 10, 11], np.int32)], np.array([2, 1]),
                  np.array([0.5, 1.5], np.float32), 0)
    b = make_batch(enc, np.array([1, 0]), batch_size=3, max_len=64)
    assert b["input_ids"].shape == (3, 16)
    np.testing.assert_array_equal(b["loss_mask"][0, :4], [0, 1, 1, 0])
    np.testing.assert_array_equal(b["loss_mask"][1, :5], [0, 0, 1, 1, 0])
    np.testing.assert_array_equal(b["valid"], [1, 1, 0])
    np.testing.assert_array_equal(b["weight"], [1.5, 0.5, 0])


def test_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1e-3, warmup_frac=0.1)
    lr = schedule(cfg, 100)
    assert float(lr(0)) == 0.0
    assert math.isclose(float(lr(5)), 5e-4, rel_tol=1e-5)
    assert math.isclose(float(lr(10)), 1e-3, rel_tol=1e-5)
    assert math.isclose(float(lr(55)), 5e-4, rel_tol=1e-4)
    assert float(lr(100)) < 1e-9


def test_training_lowers_the_loss():
    model = _model()
    enc = _encoded(8)
    result = train(model, enc, TrainConfig(lr=3e-2, epochs=6, batch_size=4, max_len=32, warmup_frac=0.0))
    assert result.steps == 12 and len(result.losses) == 12
    assert np.mean(result.losses[-2:]) < np.mean(result.losses[:2])
    assert result.tokens == 6 * int(sum(len(t) - p for t, p in zip(enc.tokens, enc.n_prompt, strict=True)))


def test_checkpoint_kill_resume_is_bit_identical(tmp_path):
    enc = _encoded(9, seed=1)
    cfg = TrainConfig(lr=1e-2, epochs=2, batch_size=2, grad_accum=2, max_len=32, checkpoint_every=2)
    reference = _model(1)
    ref = train(reference, enc, cfg, ckpt_dir=tmp_path / "a", fingerprint="x")  # dir missing: no checkpoint

    ckpt = tmp_path / "b"
    ckpt.mkdir()

    class Killed(Exception):
        pass

    def kill(step: int, loss: float) -> None:
        if step == 3:  # after the checkpoint of step 2, before the one of step 4
            raise Killed

    first = _model(1)
    with pytest.raises(Killed):
        train(first, enc, cfg, ckpt_dir=ckpt, fingerprint="x", on_step=kill)
    meta = read_checkpoint_meta(ckpt)
    assert meta is not None and meta["step"] == 2
    with pytest.raises(SotjaxInputError, match="other inputs or settings"):
        train(_model(1), enc, cfg, ckpt_dir=ckpt, fingerprint="y", resume=True)
    resumed_model = _model(1)
    resumed = train(resumed_model, enc, cfg, ckpt_dir=ckpt, fingerprint="x", resume=True)
    assert resumed.resumed_from == 2 and resumed.steps == ref.steps == 5
    assert resumed.losses == ref.losses
    a, b = lora_arrays(reference), lora_arrays(resumed_model)
    for name in a:
        for x, y in zip(a[name], b[name], strict=True):
            np.testing.assert_array_equal(x, y)
    assert np.abs(a["q_proj"][1]).max() > 0  # B moved away from 0: the comparison is not trivial


def test_bad_train_config_is_one_line():
    for kwargs, needle in [(dict(lr=0), "--lr"), (dict(epochs=0), "--epochs"), (dict(batch_size=-1), "--batch-size"),
                           (dict(grad_accum=True), "--grad-accum"), (dict(max_len=2), "--max-len")]:
        with pytest.raises(SotjaxInputError, match=needle):
            TrainConfig(**kwargs)


def _run(ids, selected, train_weight, weights=None):
    n = len(ids)
    return SimpleNamespace(path=Path("run"), ids=tuple(ids), selected=np.asarray(selected),
                           train_weight=np.asarray(train_weight, float),
                           weights=np.asarray(weights if weights is not None else np.full(n, 1 / n)))


def _corpus(path: Path, ids) -> Path:
    path.write_text("".join(json.dumps({"id": i, "prompt": f"question {i}", "response": f"answer {i}"}) + "\n"
                            for i in ids))
    return path


def test_training_rows_modes_and_mismatch(tmp_path):
    data = _corpus(tmp_path / "c.jsonl", ["a", "b", "c", "d"])
    run = _run(["a", "b", "c", "d"], [True, False, True, True], [1.5, 0, 0.5, 1.0], [0.4, 0.1, 0.2, 0.3])
    rows = training_rows(run, data)
    assert rows.ids == ["a", "c", "d"] and rows.weights.tolist() == [1.5, 0.5, 1.0] and rows.mode == "topk+weights"
    assert rows.prompts[1] == "question c"
    assert training_rows(run, data, use_weights=False).weights.tolist() == [1, 1, 1]
    everything = training_rows(run, data, all_rows=True)
    np.testing.assert_allclose(everything.weights, [1.6, 0.4, 0.8, 1.2])
    assert training_rows(run, data, all_rows=True, use_weights=False).mode == "all"
    with pytest.raises(SotjaxInputError, match="1 of the run's 5 ids are not in the data"):
        training_rows(_run(["a", "b", "c", "d", "zz"], [1, 1, 1, 1, 1], [1] * 5), data)
    with pytest.raises(SotjaxInputError, match="1 rows are not in the run"):
        training_rows(_run(["a", "b", "c"], [1, 1, 1], [1] * 3), data)


def test_encode_rows_masks_the_prompt_exactly(tmp_path):
    from sotjax.models.tokenizer import tokenizer_from_directory

    tok = tokenizer_from_directory(FIXTURE)
    data = _corpus(tmp_path / "c.jsonl", ["a", "b"])
    rows = training_rows(_run(["a", "b"], [True, True], [1.0, 1.0]), data)
    enc = encode_rows(tok, rows, max_len=64, template="human_assistant")
    head, _ = tok.encode(["Human: question a\nAssistant:"], 1 << 20)
    assert enc.tokens[0][: enc.n_prompt[0]].tolist() == head[0]
    tail, _ = tok.encode([" answer a" + (tok.eos_token or "")], 1 << 20, add_special_tokens=False)
    assert enc.tokens[0][enc.n_prompt[0]:].tolist() == tail[0]
    short = encode_rows(tok, rows, max_len=8, template="human_assistant")
    assert short.n_truncated == 2 and all(len(t) <= 8 for t in short.tokens)
    assert all(len(t) - p >= 1 for t, p in zip(short.tokens, short.n_prompt, strict=True))
    batch = make_batch(enc, np.array([0, 1]), 2, 64)
    assert jnp.asarray(batch["loss_mask"]).sum() == sum(len(t) - p for t, p in zip(enc.tokens, enc.n_prompt,
                                                                                      strict=True))
