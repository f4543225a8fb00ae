"""The one exception type that carries a user-facing message (the CLI prints it on one line)."""


class OnnxSapError(Exception):
    """A problem with the user's input or environment; the message names it and says what to do."""
