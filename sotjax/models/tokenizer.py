"""Tokenisers through the ``tokenizers`` library: from ``tokenizer.json`` or built from GGUF metadata.

GGUF files of BPE models (``tokenizer.ggml.model == "gpt2"``) store the vocabulary, merges and token
types; we rebuild a byte-level BPE with the pre-tokeniser llama.cpp uses for the file's
``tokenizer.ggml.pre`` (e.g. ``smollm``: split every digit, then GPT-2's regex). Control tokens
(type 3) and user-defined tokens (type 4) become added tokens, so chat markers such as
``<|im_start|>`` are single tokens. A BOS token is prepended when ``tokenizer.ggml.add_bos_token``
says so. Other GGUF tokenisers (SentencePiece ``llama``) fall back to transformers' GGUF converter.

Truncation keeps the first ``max_length`` tokens by default (``side="right"``), counting special
tokens, and reports how many texts were cut.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sotjax.errors import SotjaxInputError

# llama.cpp pre-tokeniser regexes (llama-vocab.cpp), keyed by ``tokenizer.ggml.pre``.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DIGIT_SPLIT_PRES = ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva")
GPT2_PRES = ("default", "gpt2", "gpt-2", "olmo", "jais", "stablelm2", "mpt", "phi-2")
LLAMA3_PRES = ("llama-bpe", "llama3", "smaug-bpe", "dbrx")
QWEN2_PRES = ("qwen2", "deepseek-r1-qwen")


@dataclass
class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus what the feature pipeline needs to know about it."""

    tokenizer: Any  # tokenizers.Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    source: str

    def encode(
        self, texts: Sequence[str], max_length: int, side: str = "right", add_special_tokens: bool = True
    ) -> tuple[list[list[int]], int]:
        """Token ids per text (at most ``max_length``) and the number of truncated texts."""
        tok = self.tokenizer
        tok.no_padding()
        tok.enable_truncation(max_length=max_length, direction=side)
        encodings = tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        ids = [e.ids for e in encodings]
        n_truncated = sum(1 for e in encodings if e.overflowing)
        return ids, n_truncated


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode table (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tokenizer_from_gguf(metadata: dict[str, Any], path: str | os.PathLike) -> TextTokenizer:
    """Rebuild the tokenizer stored in a GGUF file's metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise SotjaxInputError(f"{path}: GGUF file has no tokenizer (tokenizer.ggml.model/tokens missing)")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    chat_template = metadata.get("tokenizer.chat_template")
    if kind != "gpt2":
        return _tokenizer_via_transformers(path, chat_template)

    merges_raw = metadata.get("tokenizer.ggml.merges")
    if merges_raw is None:
        raise SotjaxInputError(f"{path}: GGUF BPE tokenizer has no merges (tokenizer.ggml.merges)")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tokenizer = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in DIGIT_SPLIT_PRES:
        regex = GPT2_REGEX
        steps = [pre_tokenizers.Digits(individual_digits=True)]
    elif pre in GPT2_PRES:
        regex, steps = GPT2_REGEX, []
    elif pre in LLAMA3_PRES:
        regex, steps = LLAMA3_REGEX, []
    elif pre in QWEN2_PRES:
        regex, steps = QWEN2_REGEX, []
    else:
        return _tokenizer_via_transformers(path, chat_template)
    steps += [pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False), byte_level]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()

    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    added = [
        AddedToken(tok, special=(t == 3), normalized=False)
        for tok, t in zip(tokens, types)
        if t in (3, 4)
    ]
    tokenizer.add_special_tokens([a for a in added if a.special])
    tokenizer.add_tokens([a for a in added if not a.special])

    def token(key: str) -> str | None:
        idx = metadata.get(key)
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    return TextTokenizer(tokenizer, chat_template, bos, eos, source=f"gguf:{pre}")


def _tokenizer_via_transformers(path: str | os.PathLike, chat_template: str | None) -> TextTokenizer:
    """Use transformers' GGUF tokenizer converter for tokenisers we do not rebuild ourselves."""
    path = Path(path)
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:
        raise SotjaxInputError(f"{path}: cannot build the tokenizer from GGUF metadata ({err})") from None
    return TextTokenizer(hf.backend_tokenizer, chat_template, hf.bos_token, hf.eos_token, source="gguf:transformers")


def tokenizer_from_directory(directory: str | os.PathLike) -> TextTokenizer:
    """``tokenizer.json`` (+ ``tokenizer_config.json`` for the chat template and BOS/EOS names)."""
    from tokenizers import Tokenizer

    directory = Path(directory)
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise SotjaxInputError(f"{directory}: tokenizer.json is missing")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:
        raise SotjaxInputError(f"{path}: cannot load tokenizer ({err})") from None
    cfg: dict[str, Any] = {}
    cfg_path = directory / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except ValueError as err:
            raise SotjaxInputError(f"{cfg_path}: invalid JSON ({err})") from None
    chat_template = cfg.get("chat_template")
    jinja = directory / "chat_template.jinja"
    if chat_template is None and jinja.is_file():
        chat_template = jinja.read_text()

    def name(value: Any) -> str | None:
        return value.get("content") if isinstance(value, dict) else value

    return TextTokenizer(tokenizer, chat_template, name(cfg.get("bos_token")), name(cfg.get("eos_token")),
                         source=str(path))
