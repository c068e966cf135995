"""python -m jobs.prepare CONFIG [--profile NAME] [--set key=value ...]: data -> Parquet shards + manifest."""

if __name__ == "__main__":
    import sys

    from jobs.cli import main

    main(["prepare", *sys.argv[1:]])
