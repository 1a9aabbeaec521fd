"""sotjax.data.tasks: the length-matched benign task generator (arithmetic checked independently)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from sotjax.data.tasks import MAX_ITEMS, generate_tasks
from sotjax.errors import SotjaxInputError

# "a × b = c", "a + b − c = d", "a + b + c = d" (the worked steps and totals)
_EQUATION = re.compile(r"((?:-?\d+\s*[×+−]\s*)+-?\d+)\s*=\s*(-?\d+)")


def _evaluate(expr: str) -> int:
    tokens = re.findall(r"-?\d+|[×+−]", expr)
    # × binds tighter than + and −: fold products first
    terms: list[int] = [int(tokens[0])]
    ops: list[str] = []
    for op, num in zip(tokens[1::2], tokens[2::2], strict=True):
        if op == "×":
            terms[-1] *= int(num)
        else:
            ops.append(op)
            terms.append(int(num))
    total = terms[0]
    for op, t in zip(ops, terms[1:], strict=True):
        total = total + t if op == "+" else total - t
    return total


def test_every_worked_step_and_total_is_correct() -> None:
    rows = generate_tasks(200, [300, 800, 2000], seed=3)
    checked = 0
    for r in rows:
        equations = _EQUATION.findall(r.response)
        assert equations, r.id
        for expr, value in equations:
            assert _evaluate(expr) == int(value), (r.id, expr, value)
            checked += 1
    assert checked > 1000


def test_lengths_follow_the_target_distribution() -> None:
    rng = np.random.default_rng(0)
    target = rng.lognormal(mean=6.8, sigma=0.7, size=400).astype(int) + 100
    rows = generate_tasks(600, target, seed=0)
    lengths = np.array([len(r.prompt) + len(r.response) for r in rows])
    # each row reaches its drawn target unless a family ran out of items (capped at MAX_ITEMS or its list)
    q_gen, q_tgt = np.percentile(lengths, [25, 50, 75]), np.percentile(target, [25, 50, 75])
    np.testing.assert_allclose(q_gen, q_tgt, rtol=0.2)
    assert MAX_ITEMS >= 50


def test_deterministic_prefix_stable_benign_and_distinct() -> None:
    a = generate_tasks(50, [500, 1500], seed=7)
    b = generate_tasks(80, [500, 1500], seed=7)
    assert [r.id for r in a] == [r.id for r in b[:50]]
    assert len({r.hash for r in b}) == 80
    assert all(r.label == "benign" and r.source == "tasks" and r.id.startswith("tasks:") for r in b)
    assert [r.id for r in generate_tasks(50, [500, 1500], seed=8)] != [r.id for r in a]


@pytest.mark.parametrize("n, lengths", [(0, [100]), (True, [100]), (5, []), (5, [0, 10])])
def test_bad_arguments_one_line(n, lengths) -> None:
    with pytest.raises(SotjaxInputError):
        generate_tasks(n, lengths)
