"""Errors a user can cause with their data."""


class DataError(Exception):
    """A data problem the user can fix: missing path, corrupt shard, bad CSV columns, undecodable image.

    The message is one line that names the thing (file path, column, image id); the CLI prints
    ``str(err)`` and exits 1 instead of showing a stack trace.
    """


def one_line(err: BaseException, limit: int = 200) -> str:
    """First line of an exception message, capped: a DataError that quotes another error stays one line."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
