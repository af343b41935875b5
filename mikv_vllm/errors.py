"""Errors shown to the user as one ``error: ...`` line (exit status 2) by the ``mikv-vllm`` CLI."""


class CLIError(Exception):
    """A user-facing error: printed as ``error: <message>``, exit status 2."""
