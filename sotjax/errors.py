"""Errors that the command line turns into one clear line (never a traceback).

* :class:`SotjaxInputError` — bad user input (a file, a field, an option value): exit code 2.
* :class:`SotjaxRuntimeError` — the job could not finish for a reason outside the input's content
  (disk full, an output that cannot be written, a numerical breakdown): exit code 1.

Messages are one line and name the offending file/field/option; :func:`shorten` keeps a value
quoted in a message short, whatever its size.
"""

from __future__ import annotations

from typing import Any

MAX_VALUE_CHARS = 80


class SotjaxInputError(ValueError):
    """Bad user input: a file, a field or an option value.

    The message is one line and names the offending file/field/option, e.g.
    ``"corpus.jsonl: line 7: field 'embedding' is missing"``.
    """


class SotjaxRuntimeError(RuntimeError):
    """The job could not finish (disk full, unwritable output, numerical failure); exit code 1.

    The message is one line naming the path or the step and what to try.
    """


class SotjaxWarning(UserWarning):
    """Something the user should know about a finished job (e.g. a fit that hit its step limit).

    Library code warns; the command line prints it as one line ``sotjax CMD: warning: ...``.
    """


def shorten(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """A bounded ``repr(value)`` for messages: at most ``limit`` characters, whatever the value's size.

    A plain ``repr`` of a hostile value can be huge (a YAML alias bomb expands to gigabytes), so the
    value is rendered with :mod:`reprlib` (depth and item counts capped) and then cut.
    """
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 6, 6, 6, 6
    r.maxstring, r.maxother, r.maxlong = limit, limit, limit
    try:
        text = r.repr(value)
    except Exception:  # a hostile __repr__ must not break an error message
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[: limit - 1]}…"
