"""Errors that the command line turns into one clear line and exit code 2."""

from __future__ import annotations


class SotjaxInputError(ValueError):
    """Bad user input: a file, a field or an option value.

    The message is one line and names the offending file/field/option, e.g.
    ``"corpus.jsonl: line 7: field 'embedding' is missing"``.
    """
