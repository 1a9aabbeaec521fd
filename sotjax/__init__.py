"""sotjax: JAX-native optimal-transport sample weighting for safe LLM fine-tuning.

Implements SOT (Wang et al., ACL 2026): learn per-sample weights ``w = softmax(logits)`` that pull
the fine-tuning corpus towards a safe anchor set and push it away from a harmful reference set
with entropic optimal transport, then keep the Top-K.

    >>> import sotjax
    >>> result = sotjax.fit(corpus, safe, harmful, sotjax.SOTConfig(lam=0.5, epsilon=0.1))
    >>> selection = sotjax.select(result.weights, keep=0.8, logits=result.logits)

Importing sotjax has no side effects (no jax configuration is changed).
"""

from sotjax.config import SOTConfig
from sotjax.errors import SotjaxInputError
from sotjax.fit import SOTResult, fit
from sotjax.select import Selection, select

__all__ = ["SOTConfig", "SOTResult", "Selection", "SotjaxInputError", "fit", "select"]
__version__ = "0.1.0"
