"""Subcommands of the ``sotjax`` CLI (see :mod:`sotjax.cli`)."""
