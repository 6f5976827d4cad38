"""The one exception type for user-facing data problems."""


class DataError(ValueError):
    """A problem with the user's data or data config; the message is one line naming the culprit
    (file:line, column, key or task), so the CLI can print it without a traceback."""
