"""Tokenisers through the ``tokenizers`` library: from ``tokenizer.json`` or built from GGUF metadata.

GGUF files of BPE models (``tokenizer.ggml.model == "gpt2"``) store the vocabulary, merges and token
types; we rebuild a byte-level BPE with the pre-tokeniser llama.cpp uses for the file's
``tokenizer.ggml.pre`` (e.g. ``smollm``: split every digit, then GPT-2's regex). Control tokens
(type 3) and user-defined tokens (type 4) become added tokens, so chat markers such as
``<|im_start|>`` are single tokens. A BOS token is prepended when ``tokenizer.ggml.add_bos_token``
says so. Other GGUF tokenisers (SentencePiece ``llama``) fall back to transformers' GGUF converter.

Truncation keeps the first ``max_length`` tokens by default (``side="right"``), counting special
tokens, and reports how many texts were cut.

Bad tokenizer data is one :class:`~sotjax.errors.SotjaxInputError` line naming the file: GGUF
tokens/merges/token types of the wrong type or length, special-token ids that are not integers,
a ``tokenizer.json`` the library cannot load, a ``tokenizer_config.json`` that is not a JSON object
(at most :data:`MAX_TOKENIZER_CONFIG_BYTES`), a chat template that is neither a string nor a list of
``{"name", "template"}`` entries, a ``chat_template.jinja`` over
:data:`~sotjax.features.templates.MAX_TEMPLATE_SOURCE_CHARS` bytes. Files of a checkpoint directory
must resolve inside it (see :func:`sotjax.io.resolve_inside`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sotjax.errors import SotjaxInputError, shorten

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
#: largest ``tokenizer_config.json`` read (bytes)
MAX_TOKENIZER_CONFIG_BYTES = 16 << 20


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
        try:
            tok.no_padding()
            tok.enable_truncation(max_length=max_length, direction=side)
            encodings = tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        except Exception as err:  # the Rust library raises plain Exception
            raise SotjaxInputError(f"{self.source}: tokenisation failed ({_one_line(err)})") from None
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
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def _string_list(metadata: dict[str, Any], key: str, path: Any) -> list[str] | None:
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SotjaxInputError(f"{path}: GGUF metadata '{key}' must be a list of strings")
    return value


def tokenizer_from_gguf(metadata: dict[str, Any], path: str | os.PathLike) -> TextTokenizer:
    """Rebuild the tokenizer stored in a GGUF file's metadata."""
    kind = metadata.get("tokenizer.ggml.model")
    tokens = _string_list(metadata, "tokenizer.ggml.tokens", path)
    if kind is None or tokens is None:
        raise SotjaxInputError(f"{path}: GGUF file has no tokenizer (tokenizer.ggml.model/tokens missing)")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    chat_template = metadata.get("tokenizer.chat_template")
    if kind != "gpt2":
        return _tokenizer_via_transformers(path, chat_template)

    merges_raw = _string_list(metadata, "tokenizer.ggml.merges", path)
    if merges_raw is None:
        raise SotjaxInputError(f"{path}: GGUF BPE tokenizer has no merges (tokenizer.ggml.merges)")
    for i, m in enumerate(merges_raw):
        if " " not in m:
            raise SotjaxInputError(f"{path}: GGUF metadata 'tokenizer.ggml.merges'[{i}] {shorten(m)} is not 'a b'")
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if not isinstance(types, list) or len(types) != len(tokens) or not all(isinstance(t, int) for t in types):
        raise SotjaxInputError(f"{path}: GGUF metadata 'tokenizer.ggml.token_type' must hold one integer per token "
                               f"({len(tokens)} tokens)")
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        idx = metadata.get(key)
        if idx is not None and (isinstance(idx, bool) or not isinstance(idx, int)):
            raise SotjaxInputError(f"{path}: GGUF metadata '{key}' must be an integer, got {shorten(idx)}")
    try:
        return _gguf_bpe(metadata, tokens, merges_raw, types, pre, chat_template, path)
    except SotjaxInputError:
        raise
    except Exception as err:  # the tokenizers library raises plain Exception / TypeError on bad data
        raise SotjaxInputError(f"{path}: cannot build the tokenizer from GGUF metadata ({_one_line(err)})") from None


def _gguf_bpe(metadata: dict[str, Any], tokens: list[str], merges_raw: list[str], types: list[int], pre: Any,
              chat_template: Any, path: str | os.PathLike) -> TextTokenizer:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [(a, b) for a, b in (m.split(" ", 1) for m in merges_raw)]
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tokenizer = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in DIGIT_SPLIT_PRES:
        regex = GPT2_REGEX
        steps: list[Any] = [pre_tokenizers.Digits(individual_digits=True)]
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

    added = [
        AddedToken(tok, special=(t == 3), normalized=False)
        for tok, t in zip(tokens, types, strict=True)
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
        raise SotjaxInputError(f"{path}: cannot build the tokenizer from GGUF metadata ({_one_line(err)})") from None
    return TextTokenizer(hf.backend_tokenizer, chat_template, hf.bos_token, hf.eos_token, source="gguf:transformers")


def _chat_template_value(value: Any, where: Path) -> str | None:
    """A ``tokenizer_config.json`` chat template: a string, or HF's list of named templates ("default")."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) for t in value):
        named = {t.get("name"): t.get("template") for t in value}
        chosen = named.get("default")
        if isinstance(chosen, str):
            return chosen
        raise SotjaxInputError(f"{where}: field 'chat_template' lists no 'default' template")
    raise SotjaxInputError(f"{where}: field 'chat_template' must be a string or a list of named templates, "
                           f"got {type(value).__name__}")


def _token_name(value: Any, key: str, where: Path) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise SotjaxInputError(f"{where}: field '{key}' must be a string, got {shorten(value)}")


def tokenizer_from_directory(directory: str | os.PathLike) -> TextTokenizer:
    """``tokenizer.json`` (+ ``tokenizer_config.json`` for the chat template and BOS/EOS names)."""
    from tokenizers import Tokenizer

    from sotjax.features.templates import MAX_TEMPLATE_SOURCE_CHARS
    from sotjax.io import check_input_file, hub_cache_roots, read_json_file, resolve_inside

    directory = Path(directory)
    roots = hub_cache_roots(directory)

    def present(name: str) -> Path | None:
        path = directory / name
        if not (path.exists() or path.is_symlink()):
            return None
        resolve_inside(directory, name, directory, "file", roots)
        return check_input_file(path)

    path = present("tokenizer.json")
    if path is None:
        raise SotjaxInputError(f"{directory}: tokenizer.json is missing")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:
        raise SotjaxInputError(f"{path}: cannot load tokenizer ({_one_line(err)})") from None
    cfg: Any = {}
    cfg_path = present("tokenizer_config.json")
    if cfg_path is not None:
        cfg = read_json_file(cfg_path, MAX_TOKENIZER_CONFIG_BYTES, "tokenizer_config.json")
        if not isinstance(cfg, dict):
            raise SotjaxInputError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    where = cfg_path or directory / "tokenizer_config.json"
    chat_template = _chat_template_value(cfg.get("chat_template"), where)
    jinja = present("chat_template.jinja") if chat_template is None else None
    if jinja is not None:
        if jinja.stat().st_size > MAX_TEMPLATE_SOURCE_CHARS:
            raise SotjaxInputError(f"{jinja}: chat template larger than {MAX_TEMPLATE_SOURCE_CHARS} bytes")
        try:
            chat_template = jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise SotjaxInputError(f"{jinja}: not UTF-8 text") from None
    bos = _token_name(cfg.get("bos_token"), "bos_token", where)
    eos = _token_name(cfg.get("eos_token"), "eos_token", where)
    return TextTokenizer(tokenizer, chat_template, bos, eos, source=str(path))
