"""sotjax: JAX-native optimal-transport sample weighting for safe LLM fine-tuning.

Implements SOT (Wang et al., ACL 2026): learn per-sample weights ``w = softmax(logits)`` that pull
the fine-tuning corpus towards a safe anchor set and push it away from a harmful reference set
with entropic optimal transport, then keep the Top-K.

    >>> import sotjax
    >>> result = sotjax.fit(corpus, safe, harmful, sotjax.SOTConfig(lam=0.5, epsilon=0.1))
    >>> selection = sotjax.select(result.weights, keep=0.8, logits=result.logits)

Importing sotjax has no side effects (no jax configuration is changed) and is cheap: jax and
ott-jax are imported on first use of ``fit`` (so that ``sotjax --help`` is instant).
"""

from __future__ import annotations

import importlib
from typing import Any

from sotjax.config import SOTConfig
from sotjax.errors import SotjaxInputError
from sotjax.select import Selection, select

__all__ = ["SOTConfig", "SOTResult", "Selection", "SotjaxInputError", "fit", "select"]
__version__ = "0.1.0"

_LAZY = {"fit": "sotjax.learn", "SOTResult": "sotjax.learn"}


def __getattr__(name: str) -> Any:  # PEP 562: heavy members load on first access
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sotjax' has no attribute {name!r}")
