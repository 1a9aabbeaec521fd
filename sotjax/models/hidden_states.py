"""Hidden-state indexing shared by the models (Hugging Face ``output_hidden_states`` convention).

Index 0 is the token embedding, ``i`` the output of block ``i``, and ``num_layers`` (or -1) the last
layer; negative indices count back from ``num_layers``.
"""

from __future__ import annotations


def resolve_layer(layer: int, num_layers: int) -> int:
    """Map a Python-style hidden-state index onto ``0..num_layers``; ValueError when out of range."""
    resolved = layer + num_layers + 1 if layer < 0 else layer
    if not 0 <= resolved <= num_layers:
        raise ValueError(f"layer {layer} is out of range for a {num_layers}-layer model")
    return resolved
