"""The one exception type users see for problems they can fix."""


class SurgeryError(ValueError):
    """A user-caused problem, reported in one line that says what to do."""


class UsageError(SurgeryError):
    """A bad option or argument value; the command line exits 2 for it."""


def first_line(error: Exception) -> str:
    """The first line of an error's message, or its type when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
