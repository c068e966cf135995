"""Errors a user can cause with their data."""


class DataError(Exception):
    """A data problem the user can fix: missing path, corrupt shard, bad CSV columns, undecodable image.

    The message is one line that names the thing (file path, column, image id); the CLI prints
    ``str(err)`` and exits 1 instead of showing a stack trace.
    """
