"""Render (prompt, response) pairs into the text that is embedded.

``human_assistant`` (the SOT paper's literal form, default)::

    Human: {prompt}
    Assistant: {response}

``chat``: the model's own chat template (Jinja, from the GGUF metadata or ``tokenizer_config.json``)
applied to ``[{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]``
with ``add_generation_prompt=False``; the rendered text already holds the special tokens, so it is
tokenised without adding BOS again (as ``transformers``' ``apply_chat_template`` does).
"""

from __future__ import annotations

from typing import Sequence

from sotjax.errors import SotjaxInputError

HUMAN_ASSISTANT = "Human: {prompt}\nAssistant: {response}"


def _check_strings(values: Sequence[str], what: str) -> None:
    if isinstance(values, str) or not hasattr(values, "__len__"):
        raise SotjaxInputError(f"{what} must be a list of strings, got {type(values).__name__}")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise SotjaxInputError(f"{what}[{i}] is {type(v).__name__}, expected a string")


def validate_pairs(prompts: Sequence[str], responses: Sequence[str] | None) -> None:
    """Raise :class:`SotjaxInputError` naming the first bad element (non-string, empty, length mismatch)."""
    what = "texts" if responses is None else "prompts"
    _check_strings(prompts, what)
    if len(prompts) == 0:
        raise SotjaxInputError(f"{what} is empty: nothing to embed")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise SotjaxInputError(f"{what}[{i}] is empty")
    if responses is not None:
        _check_strings(responses, "responses")
        if len(responses) != len(prompts):
            raise SotjaxInputError(f"responses has {len(responses)} items but prompts has {len(prompts)}")


def render_chat_template(template: str, messages: list[dict[str, str]], bos_token: str | None,
                         eos_token: str | None) -> str:
    """Render a Hugging Face-style Jinja chat template in a sandbox (no generation prompt)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=False, bos_token=bos_token or "", eos_token=eos_token or ""
        )
    except TemplateError as err:
        raise SotjaxInputError(f"chat template failed to render: {err}") from None


def format_texts(
    prompts: Sequence[str],
    responses: Sequence[str] | None,
    template: str,
    chat_template: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> list[str]:
    """The strings to embed; ``responses=None`` returns the prompts unchanged (single-text mode)."""
    validate_pairs(prompts, responses)
    if responses is None:
        return list(prompts)
    if template == "human_assistant":
        return [HUMAN_ASSISTANT.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
    if template == "chat":
        if not chat_template:
            raise SotjaxInputError("template 'chat': this model has no chat template (use 'human_assistant')")
        return [
            render_chat_template(
                chat_template,
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                bos_token, eos_token,
            )
            for p, r in zip(prompts, responses)
        ]
    raise SotjaxInputError(f"unknown template '{template}' (choose human_assistant or chat)")
