"""The one exception type that carries a user-facing message (the CLI prints it on one line)."""


class OnnxSapError(Exception):
    """A problem with the user's input or environment; the message names it and says what to do."""


class OptionError(OnnxSapError):
    """A bad value of an API parameter. The message names the Python parameter (`passes must be >= 1`);
    the CLI, which knows its flags, reports the same problem under the flag's name (as_flag)."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.name = name
        self.problem = problem

    def as_flag(self, flags: dict[str, str] | None = None) -> str:
        """The message with the flag in place of the parameter (default: --name-with-dashes)."""
        flag = (flags or {}).get(self.name, "--" + self.name.replace("_", "-"))
        return f"{flag} {self.problem}"


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise OptionError unless value is one of choices."""
    if value not in choices:
        raise OptionError(name, f"must be one of {', '.join(choices)}, got {value!r}")


def first_line(e: Exception, limit: int = 300) -> str:
    """The first line of an exception's message (ONNX Runtime's and onnx's run long)."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
