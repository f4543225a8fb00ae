"""The one exception type that carries a user-facing message (the CLI prints it on one line)."""


class OnnxSapError(Exception):
    """A problem with the user's input or environment; the message names it and says what to do."""


def first_line(e: Exception, limit: int = 300) -> str:
    """The first line of an exception's message (ONNX Runtime's and onnx's run long)."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
