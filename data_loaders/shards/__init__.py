"""Parquet shards plus a ``manifest.json``, and what every task's loader shares around them.

Layout written by :func:`write_splits` (or :class:`ShardWriter`)::

    root/manifest.json
    root/<split>/part-00000.parquet
    root/<split>/part-00001.parquet ...

- ``manifest``: the writer, the manifest (the commit point, written last and atomically), checks.
- ``read``: checked shard paths, the Ray Dataset and plain-pyarrow batches a task decodes.
- ``prepare``: the skeleton of a task's ``prepare``: settings checks, hashed splits, reuse, skips.
"""

from .manifest import (
    FORMAT_VERSION,
    MANIFEST,
    ShardWriter,
    fingerprint,
    load_manifest,
    reusable,
    sha256_file,
    shard_paths,
    verify,
    write_splits,
)
from .prepare import (
    IMAGE_ERRORS,
    assign_split,
    check_at_least,
    check_choice,
    check_fractions,
    check_source,
    encode_png,
    import_limit,
    prepared_with,
    settings_of,
    warn_skipped,
)
from .read import iter_tables, open_split, read_dataset, readable_paths

__all__ = [
    "FORMAT_VERSION",
    "IMAGE_ERRORS",
    "MANIFEST",
    "ShardWriter",
    "assign_split",
    "check_at_least",
    "check_choice",
    "check_fractions",
    "check_source",
    "encode_png",
    "fingerprint",
    "import_limit",
    "iter_tables",
    "load_manifest",
    "open_split",
    "prepared_with",
    "read_dataset",
    "readable_paths",
    "reusable",
    "settings_of",
    "sha256_file",
    "shard_paths",
    "verify",
    "write_splits",
    "warn_skipped",
]
