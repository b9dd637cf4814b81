"""The one exception type users see for problems they can fix."""


class SurgeryError(ValueError):
    """A user-caused problem, reported in one line that says what to do."""
