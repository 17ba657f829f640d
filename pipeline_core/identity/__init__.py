"""What a run is: the identity of its job, model and input (keys.py, provenance.py), and job_identity (job.py).

A run directory records it; a rerun whose identity differs is another job. Kept light: status and report import
keys.py, and nothing here loads a model.
"""
