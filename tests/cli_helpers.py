"""Shared helpers of the CLI tests: run ``sotjax`` in a subprocess, check one-line errors, snapshot trees."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

TIMEOUT = 120


def sotjax(*args, cwd=None, env=None, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``python -m sotjax.cli ARGS`` on the CPU; ``env`` adds to the environment."""
    full_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sotjax.cli", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess, code: int, command: str | None = None) -> str:
    """Assert exit ``code`` and exactly one short stderr line without a traceback; return the line."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert len(lines[0]) < 500, lines[0][:600]
    if command is not None:
        assert lines[0].startswith(f"sotjax {command}: error: "), lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> content hash of everything under ``root``, never reading a FIFO/device or
    following a link."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = f"link:{os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "<dir>"
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "<special>"
    return out


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (bound to port 0, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def jax_child_env() -> dict[str, str]:
    """The environment of a child JAX process: CPU, this checkout importable, no proxy variables (gRPC
    honours them; JAX warns they can hang initialize), devices set by the child (not ``XLA_FLAGS``)."""
    repo = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")])))
    return env


def run_together(commands: list[list[str]], envs: list[dict[str, str]], timeout: float = 150
                 ) -> list[subprocess.CompletedProcess]:
    """Run ``commands`` at once (each with its env); their results, every child gone (a child still
    running at ``timeout`` is killed, and the timeout raised)."""
    procs = [subprocess.Popen(c, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c, e in zip(commands, envs, strict=True)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs, strict=True)]
