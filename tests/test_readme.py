"""The README stays true: its Python snippet runs as pasted, and its commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_python_snippet_runs_as_pasted():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no Python snippet"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 - our own README
    result, sel = scope["result"], scope["sel"]
    assert result.weights.shape == (500,) and abs(result.weights.sum() - 1.0) < 1e-5
    assert sel.selected.sum() == 400


def test_ci_runs_the_readme_commands_verbatim_first():
    bash = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    install, tests = bash[0].strip(), bash[1].strip()
    assert tests == "python -m pytest tests"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    steps = install.split(" && ")
    assert steps[-1] == "sotjax demo"  # the main job; CI runs everything before it, then the tests
    positions = [ci.find(step) for step in steps[:-1]]
    assert all(p >= 0 for p in positions), (steps, ci)
    assert positions == sorted(positions) and ci.find(tests) > positions[-1]
    assert ci.find(tests) < ci.find("torch==")  # the suite runs before torch is installed
