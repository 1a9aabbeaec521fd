"""Compact flax.nnx models that supply text features (Llama-family decoder, BERT-family encoder) and their loaders."""
