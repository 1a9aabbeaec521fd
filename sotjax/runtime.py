"""Process-level settings the command line applies once: where sotjax caches, and JAX's compilation cache.

Library code never changes global JAX state on import; the CLI verbs call
:func:`enable_compilation_cache` before their first jitted call.

Cache root: ``$SOTJAX_CACHE`` if set, else ``$XDG_CACHE_HOME/sotjax``, else ``~/.cache/sotjax``. It holds
``embeddings/`` (the feature cache, :mod:`sotjax.features.cache`) and ``jax/`` (XLA executables keyed by
program, shapes, devices and versions, written by JAX itself): a second process that runs the same
program (same shapes, same plan) loads it instead of compiling. ``SOTJAX_COMPILATION_CACHE=0`` turns
the compilation cache off.
"""

from __future__ import annotations

import os
from pathlib import Path

#: programs that compile faster than this are not worth a disk entry
MIN_COMPILE_SECONDS = 0.5


def cache_root() -> Path:
    """The directory under which sotjax caches (see the module docstring)."""
    explicit = os.environ.get("SOTJAX_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "sotjax"


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at ``directory`` (default ``cache_root()/jax``).

    Returns the directory, or None when disabled (``SOTJAX_COMPILATION_CACHE=0``) or when it cannot
    be created (a read-only home): the cache is an optimisation, never a reason to fail.
    """
    if os.environ.get("SOTJAX_COMPILATION_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    path = Path(directory) if directory is not None else cache_root() / "jax"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(path, os.W_OK):
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
