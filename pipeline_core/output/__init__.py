"""The run directory: a narrow storage interface, Parquet parts, run metadata, progress and the lock."""

# The run directory's own files; the leading underscore hides them from Parquet readers.
RUN_INFO = "_batchrun.json"
PROGRESS = "_progress.json"
SUCCESS = "_SUCCESS"
