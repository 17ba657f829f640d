"""The model in this process (model.engine.kind: transformers): the staged initializer loads it once, and batches
run on its device through execute.PartRunner.
"""

from __future__ import annotations

from pipeline_core.data.loader import BatchLimits
from pipeline_core.evaluation import model_label_names
from pipeline_core.execute import PartRunner, TokenBudget, token_budget
from pipeline_core.heap import HeapTrimmer
from pipeline_core.initializer import initialize, plan_summary
from pipeline_core.initializer.embedding import EmbeddingSettings
from pipeline_core.initializer.preview import ModelPreview
from pipeline_core.manifest import Job
from pipeline_core.tasks import build_task


class InProcessEngine:
    def __init__(self, job: Job, embedding: EmbeddingSettings | None, preview: ModelPreview, stop):
        self.job, self.embedding, self.preview, self.stop = job, embedding, preview, stop
        self.pipeline = None

    def open(self) -> InProcessEngine:
        self.pipeline = initialize(self.job, self.embedding, self.preview)
        return self

    def close(self) -> None:
        pass

    @property
    def device(self):
        return self.pipeline.device

    @property
    def dtype(self) -> str:
        return str(self.pipeline.model.dtype).removeprefix("torch.")

    def summary(self) -> dict:
        """plan's summary: device, dtype, generation settings, the stages and what each cost."""
        return plan_summary(self.pipeline)

    def label_names(self) -> dict | None:
        return model_label_names(self.pipeline)

    def task(self):
        return build_task(self.job, self.pipeline, should_stop=lambda: self.stop.requested)

    def runner(self, task, on_batch) -> tuple[BatchLimits, PartRunner]:
        """How batches are cut (the token budget, by device) and run (the model in this process)."""
        job, pipeline = self.job, self.pipeline
        max_tokens = token_budget(job.get("batching.max_tokens"), pipeline.device)
        limits = BatchLimits(max_tokens, job.get("batching.max_batch_size"), 8 if pipeline.device.type == "cuda" else 1)
        heap = HeapTrimmer()

        def after_batch(rows: int, tokens: int) -> None:
            on_batch(rows, tokens)
            heap.after_batch()

        return limits, PartRunner(task, pipeline.model, pipeline.device, TokenBudget(max_tokens), self.stop,
                                  on_batch=after_batch)
