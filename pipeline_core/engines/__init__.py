"""Where generation runs: the model in this process (in_process.py), or a server that speaks the OpenAI API
(served.py: vLLM, SGLang, any OpenAI-compatible command or URL). The runner knows an engine by these verbs:

    engine = open_engine(job, embedding, preview, layout, stop)   # loads the model, or starts / reaches the server
    task = engine.task()                                          # rows -> the engine's inputs -> columns
    limits, runner = engine.runner(task, on_batch)                # how slices are batched and computed
    engine.summary(), engine.label_names(), engine.device, engine.dtype
    engine.close()                                                # a started server is stopped

A runner has `submit(slice)`, `result(submitted)` and `ahead` (work.py's seam), `take_measured()`,
`take_requests()` and `device`.
"""

from __future__ import annotations

from pipeline_core.engines.settings import is_served


def open_engine(job, embedding, preview, layout, stop):
    if is_served(job):
        from pipeline_core.engines.served import ServedEngine, server_device

        engine = ServedEngine(job, preview, server_device(job, layout.local_rank), stop)
    else:
        from pipeline_core.engines.in_process import InProcessEngine

        engine = InProcessEngine(job, embedding, preview, stop)
    try:
        return engine.open()
    except BaseException:
        engine.close()
        raise


def preview_engine(job):
    """Before OUTPUT: the checkpoint's config and tokenizer, checked against the engine (exit 2 in seconds)."""
    if is_served(job):
        from pipeline_core.engines.served import preview_served

        return preview_served(job)
    from pipeline_core.initializer.preview import preview_model

    return preview_model(job)


def engine_identity(job, preview) -> dict | None:
    """A server engine's part of the run's identity (None in this process: older runs keep their fingerprint)."""
    if not is_served(job):
        return None
    from pipeline_core.engines.served import served_identity

    return served_identity(job, preview)
