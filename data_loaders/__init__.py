"""Data layer: generators and importers -> Parquet shards + manifest -> Ray Data readers.

- ``data_loaders.shards``: task-independent shard writer, manifest, verification.
- ``data_loaders.retinopathy``: synthetic fundus photos, EyePACS/APTOS importers, patient splits,
  the shared image transform and readers.
- ``data_loaders.errors.DataError``: mistakes in the user's data, reported in one line.

Nothing here imports ray or torch at import time; Ray Data is imported inside the readers.
"""
