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


def check_local(**paths: str | None) -> None:
    """``name=path`` pairs: a DataError naming the first one that is an object-storage URI
    (``s3://``, ``gs://``, ...). These paths are read and written as files; without this check a
    URI becomes a local folder named ``s3:`` and nothing reaches the bucket."""
    for name, path in paths.items():
        if path is not None and "://" in str(path):
            raise DataError(
                f"{name} is {path}: object storage is not read or written here yet; use a local or "
                "shared-filesystem path (an NFS or FUSE mount of the bucket)"
            )
