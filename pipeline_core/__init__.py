"""batchrun: run a Hugging Face model over a dataset from a YAML job manifest, into resumable Parquet parts."""

__version__ = "0.1.0"
