"""Text features for SOT: instruct-LLM last-token states or sentence embeddings, computed in JAX.

Public API::

    from sotjax.features import embed_texts, FeatureConfig, read_text_records
    ids, prompts, responses = read_text_records("data.jsonl")
    z = embed_texts(prompts, responses, config=FeatureConfig(model="smollm2"))   # (n, 576) float32
"""

from sotjax.features.config import FeatureConfig
from sotjax.features.pipeline import EmbedReport, embed_texts, embed_texts_report
from sotjax.features.records import TextRecords, read_text_records

__all__ = ["EmbedReport", "FeatureConfig", "TextRecords", "embed_texts", "embed_texts_report", "read_text_records"]
