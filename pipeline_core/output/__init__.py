"""The run directory (run_dir.py names and writes its files) behind one narrow storage interface (store.py), with
the claims that keep several processes apart, the lock, the metrics and progress of a run."""
