"""The run directory: a narrow storage interface, Parquet parts, run metadata and progress."""
