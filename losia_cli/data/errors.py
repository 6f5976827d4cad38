"""The data pipeline's error type (defined with every user-facing error in losia_cli.errors)."""

from losia_cli.errors import DataError

__all__ = ["DataError"]
