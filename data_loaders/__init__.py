"""Data layer: generators and importers -> Parquet shards + manifest -> Ray Data readers.

- ``data_loaders.shards``: task-independent shard writer, manifest, verification, and the reader
  and ``prepare`` skeleton every task shares.
- ``data_loaders.retinopathy``, ``.autonomous``, ``.recsys``: one package per task, by concern:
  ``schema``, ``settings`` (the typed argument of ``prepare``), ``synthetic`` (the generator),
  an importer per public layout, ``prepare``, ``read``.
- ``data_loaders.errors.DataError``: mistakes in the user's data, reported in one line.

Nothing here imports ray or torch at import time; Ray Data is imported inside the readers. Nothing
here imports ``jobs``: a recipe's data section builds a task's settings, not the other way round.
"""
