"""Render (prompt, response) pairs into the text that is embedded.

``human_assistant`` (the SOT paper's literal form, default)::

    Human: {prompt}
    Assistant: {response}

``chat``: the model's own chat template (Jinja, from the GGUF metadata or ``tokenizer_config.json``)
applied to ``[{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]``
with ``add_generation_prompt=False``; the rendered text already holds the special tokens, so it is
tokenised without adding BOS again (as ``transformers``' ``apply_chat_template`` does).

A chat template comes with a model file and is treated as untrusted code. It runs in Jinja's
``ImmutableSandboxedEnvironment`` (no attribute tricks, no mutation of lists/dicts) and, in addition,
under a *run budget* per rendered text (:class:`BudgetedSandbox`):

* at most :data:`MAX_TEMPLATE_STEPS` steps, where a step is one loop iteration, one call (function,
  method, macro, filter), one item a filter or method walks through in a list/tuple/dict/range
  argument, one item pulled from a filter's generator, one chunk of output or one intercepted
  operator (``*``, ``**``, ``%``, ``+``); and at most :data:`MAX_TEMPLATE_SECONDS` seconds of wall
  time (checked every 1024 steps);
* every string/list a call, filter, ``~`` concatenation or operator produces, and the rendered text
  itself, is at most ``MAX_TEMPLATE_CHARS + 8 × (characters of the messages)`` long; an integer
  argument or padding width above that size is refused *before* it allocates anything; integers
  stay below :data:`MAX_TEMPLATE_INT_BITS` bits; ``range()`` gives at most 100 000 items;
* the template source is at most :data:`MAX_TEMPLATE_SOURCE_CHARS` characters.

A template that exceeds its budget, fails to compile or raises while rendering is reported as one
:class:`~sotjax.errors.SotjaxInputError` line naming the template's source. A typical chat template
uses a few hundred steps per text, far below the budget.
"""

from __future__ import annotations

import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from jinja2 import nodes
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from sotjax.errors import SotjaxInputError, shorten

HUMAN_ASSISTANT = "Human: {prompt}\nAssistant: {response}"

#: steps (loop iterations, calls, filters, intercepted operators) one rendered text may take
MAX_TEMPLATE_STEPS = 1_000_000
#: wall-clock seconds one rendered text may take (checked every 1024 steps)
MAX_TEMPLATE_SECONDS = 2.0
#: base size (characters / items) of any value the template builds; 8 × the messages' size is added
MAX_TEMPLATE_CHARS = 1 << 20
#: largest integer (in bits) the template may compute with ``*`` or ``**``
MAX_TEMPLATE_INT_BITS = 1 << 16
#: longest accepted template source
MAX_TEMPLATE_SOURCE_CHARS = 1 << 20

_LOOP_FILTER = "__sotjax_loop_budget"
_SIZE_FILTER = "__sotjax_size_budget"
_TIME_CHECK_EVERY = 1024
_COLLECTIONS = (list, tuple, dict, set, frozenset, range)
_PRINTF_WIDTH = re.compile(r"%[#0 +-]*(\d*)(?:\.(\d*))?")
_SPEC_NUMBER = re.compile(r"\d+")


class TemplateBudgetError(SotjaxInputError):
    """A chat template went over its run budget (see the module docstring)."""


class _Budget:
    """Steps, time and value size left to one render."""

    __slots__ = ("steps_left", "deadline", "max_chars", "_next_clock")

    def __init__(self, max_chars: int) -> None:
        self.steps_left = MAX_TEMPLATE_STEPS
        self.deadline = time.monotonic() + MAX_TEMPLATE_SECONDS
        self.max_chars = max_chars
        self._next_clock = MAX_TEMPLATE_STEPS - _TIME_CHECK_EVERY

    def tick(self, n: int = 1) -> None:
        self.steps_left -= n
        if self.steps_left <= self._next_clock:
            if self.steps_left < 0:
                raise TemplateBudgetError(f"exceeded its run budget ({MAX_TEMPLATE_STEPS} steps)")
            if time.monotonic() > self.deadline:
                raise TemplateBudgetError(f"exceeded its run budget ({MAX_TEMPLATE_SECONDS:g} s)")
            self._next_clock = max(self.steps_left - _TIME_CHECK_EVERY, -1)

    def charge(self, values: Iterable[Any]) -> None:
        """One step per item of each collection in ``values`` (what a filter/method walks through)."""
        n = 1
        for v in values:
            if isinstance(v, _COLLECTIONS):
                n += len(v)
        self.tick(n)

    def size(self, value: Any) -> Any:
        """``value``, unless it is a string/collection larger than the budget."""
        if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)) and len(value) > self.max_chars:
            raise TemplateBudgetError(
                f"exceeded its run budget (built a {type(value).__name__} of {len(value)} items; "
                f"at most {self.max_chars})")
        if isinstance(value, int) and value.bit_length() > MAX_TEMPLATE_INT_BITS:
            raise TemplateBudgetError(f"exceeded its run budget (an integer over {MAX_TEMPLATE_INT_BITS} bits)")
        return value

    def width(self, n: Any) -> None:
        """Refuse an integer argument that would make a value larger than the budget."""
        if isinstance(n, int) and not isinstance(n, bool) and abs(n) > self.max_chars:
            raise TemplateBudgetError(
                f"exceeded its run budget (a size argument of {shorten(n, 24)}; at most {self.max_chars})")

    def args(self, args: Iterable[Any], kwargs: dict[str, Any]) -> None:
        for a in args:
            self.width(a)
        for a in kwargs.values():
            self.width(a)

    def format_spec(self, fmt: str) -> None:
        """Refuse ``str.format`` widths/precisions above the budget (``'{:>999999999}'``)."""
        try:
            parsed = list(string.Formatter().parse(fmt))
        except ValueError:
            return  # str.format reports it
        for _, _, spec, _ in parsed:
            for number in _SPEC_NUMBER.findall(spec or ""):
                self.width(int(number))

    def printf_spec(self, fmt: str) -> None:
        """Refuse ``%``-format widths/precisions above the budget (``'%999999999d'``)."""
        for match in _PRINTF_WIDTH.finditer(fmt):
            for number in match.groups():
                if number:
                    self.width(int(number))


class _BudgetTransformer(NodeTransformer):
    """Route every ``for`` iterable through the loop budget and every ``~`` result through the size check."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _LOOP_FILTER, [], [], None, None, lineno=node.iter.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Filter(node, _SIZE_FILTER, [], [], None, None, lineno=node.lineno)


class BudgetedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with a run budget per render (see the module docstring).

    Set :attr:`budget` to a fresh :class:`_Budget` before each render (:class:`ChatTemplate` does).
    """

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.budget = _Budget(MAX_TEMPLATE_CHARS)
        self.globals.pop("lipsum", None)  # lipsum(n=10**6) is slow and no chat template needs it
        self.globals["range"] = self._range
        self.filters = {name: self._budgeted_filter(f) for name, f in self.filters.items()}
        self.filters[_LOOP_FILTER] = self._loop
        self.filters[_SIZE_FILTER] = lambda value: self.budget.size(value)

    # -- template rewriting
    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        return _BudgetTransformer().visit(tree)

    # -- budget hooks
    def _loop(self, iterable: Any) -> Iterator[Any]:
        budget = self.budget
        for item in iterable:
            budget.tick()
            yield item

    def _range(self, *args: int) -> range:
        self.budget.tick()
        try:
            rng = range(*args)
        except OverflowError:
            rng = range(MAX_RANGE + 1)  # a bound beyond sys.maxsize: report it as too long
        if len(rng) > MAX_RANGE:
            raise TemplateBudgetError(f"exceeded its run budget (a range of more than {MAX_RANGE} items)")
        return rng

    def _budgeted_filter(self, func: Callable[..., Any]) -> Callable[..., Any]:
        import functools

        is_format = func.__name__ == "do_format"

        @functools.wraps(func)  # keeps jinja_pass_arg (pass_context / pass_environment / ...)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            budget = self.budget
            budget.charge(args)
            budget.args(args, kwargs)
            if is_format and args and isinstance(args[0], str):
                budget.printf_spec(args[0])
            result = func(*args, **kwargs)
            if isinstance(result, Iterator):  # map/select/batch/...: each item pulled costs a step
                return self._loop(result)
            return budget.size(result)

        return wrapper

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = __self.budget
        owner = getattr(__obj, "__self__", None)
        budget.charge((owner, *args))
        budget.args(args, kwargs)
        if isinstance(owner, str) and getattr(__obj, "__name__", "") == "replace" and len(args) >= 2:
            old, new = args[0], args[1]
            if isinstance(old, str) and isinstance(new, str):
                grows = (owner.count(old) if old else len(owner) + 1) * max(len(new) - len(old), 0)
                budget.width(len(owner) + grows)
        return budget.size(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:  # ``'{:>999999999}'.format``: refuse the width before anything is built
            self.budget.format_spec(value.__self__)
        return wrapped

    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        budget = self.budget
        budget.tick()
        ints = isinstance(left, int) and isinstance(right, int)
        if op == "**" and ints and right > 0 and abs(left) > 1:
            if right * left.bit_length() > MAX_TEMPLATE_INT_BITS:
                raise TemplateBudgetError(f"exceeded its run budget (an integer over {MAX_TEMPLATE_INT_BITS} bits)")
        elif op == "*":
            if ints and left.bit_length() + right.bit_length() > MAX_TEMPLATE_INT_BITS:
                raise TemplateBudgetError(f"exceeded its run budget (an integer over {MAX_TEMPLATE_INT_BITS} bits)")
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                    budget.width(len(seq) * n)
        elif op == "%" and isinstance(left, str):
            budget.printf_spec(left)
        return budget.size(super().call_binop(context, op, left, right))


class ChatTemplate:
    """A chat template compiled once, rendered many times, each render under a fresh run budget.

    ``source`` names where the template came from (a model file) in error messages.
    """

    def __init__(self, template: str, source: str | None = None) -> None:
        from jinja2 import TemplateError

        self.where = f"{source}: chat template" if source else "chat template"
        if not isinstance(template, str):
            raise SotjaxInputError(f"{self.where} is a {type(template).__name__}, not a string")
        if len(template) > MAX_TEMPLATE_SOURCE_CHARS:
            raise SotjaxInputError(f"{self.where} is longer than {MAX_TEMPLATE_SOURCE_CHARS} characters")

        def raise_exception(message: Any) -> None:
            raise TemplateError(str(message))

        self.env = BudgetedSandbox(trim_blocks=True, lstrip_blocks=True)
        self.env.globals["raise_exception"] = raise_exception
        try:
            self.template = self.env.from_string(template)
        except TemplateError as err:
            line = getattr(err, "lineno", None)
            at = f" (line {line})" if line else ""
            raise SotjaxInputError(f"{self.where} is not valid Jinja{at}: {_one_line(err)}") from None
        except RecursionError:
            raise SotjaxInputError(f"{self.where} is nested too deeply to compile") from None

    def render(self, messages: list[dict[str, str]], bos_token: str | None, eos_token: str | None) -> str:
        """The rendered text (no generation prompt); one-line :class:`SotjaxInputError` on any failure."""
        from jinja2 import TemplateError

        size = sum(len(str(m.get("content", ""))) for m in messages) + len(bos_token or "") + len(eos_token or "")
        budget = self.env.budget = _Budget(MAX_TEMPLATE_CHARS + 8 * size)
        parts: list[str] = []
        total = 0
        try:
            for chunk in self.template.generate(
                messages=messages, add_generation_prompt=False, bos_token=bos_token or "", eos_token=eos_token or ""
            ):
                total += len(chunk)
                if total > budget.max_chars:
                    raise TemplateBudgetError(
                        f"exceeded its run budget (rendered more than {budget.max_chars} characters)")
                budget.tick()
                parts.append(chunk)
        except TemplateBudgetError as err:
            raise SotjaxInputError(f"{self.where} {err}") from None
        except TemplateError as err:
            raise SotjaxInputError(f"{self.where} failed to render: {_one_line(err)}") from None
        except RecursionError:
            raise SotjaxInputError(f"{self.where} exceeded its run budget (recursion too deep)") from None
        except MemoryError:
            raise SotjaxInputError(f"{self.where} exceeded its run budget (out of memory)") from None
        except Exception as err:  # the template's own errors: 1/0, int('x'), None + 1, ...
            raise SotjaxInputError(
                f"{self.where} failed to render: {type(err).__name__}: {_one_line(err)}") from None
        return "".join(parts)


def _one_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


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
                         eos_token: str | None, source: str | None = None) -> str:
    """Render a Hugging Face-style Jinja chat template in a budgeted sandbox (no generation prompt).

    Compiles ``template`` on every call; to render many texts build one :class:`ChatTemplate`.
    """
    return ChatTemplate(template, source).render(messages, bos_token, eos_token)


def format_texts(
    prompts: Sequence[str],
    responses: Sequence[str] | None,
    template: str,
    chat_template: str | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    template_source: str | None = None,
) -> list[str]:
    """The strings to embed; ``responses=None`` returns the prompts unchanged (single-text mode).

    ``template_source`` names the chat template's origin (the model path) in error messages.
    """
    validate_pairs(prompts, responses)
    if responses is None:
        return list(prompts)
    if template == "human_assistant":
        return [HUMAN_ASSISTANT.format(prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)]
    if template == "chat":
        if not chat_template:
            raise SotjaxInputError("template 'chat': this model has no chat template (use 'human_assistant')")
        compiled = ChatTemplate(chat_template, template_source)
        return [
            compiled.render([{"role": "user", "content": p}, {"role": "assistant", "content": r}], bos_token, eos_token)
            for p, r in zip(prompts, responses, strict=True)
        ]
    raise SotjaxInputError(f"unknown template '{template}' (choose human_assistant or chat)")
