"""What a task is to the rest of batchrun: the contract that every task and its encoding follow.

A task turns a slice of input rows into model inputs (in DataLoader workers), runs batches of them on the model
(in the model's process) and turns outputs into the task's columns. The loader and the runner know a task by these
methods alone, so a task, or a task behind another engine (a model in this process, a server), is added without
touching either:

    task = build_task(job, pipeline)                     # one of tasks/*.py
    encoding = task.encode(table)                        # a slice of rows -> what each row costs, or why it failed
    inputs = task.collate(encoding, [0, 3, 5])           # rows of the slice -> one padded batch
    columns = task.decode(task.forward(model, inputs), inputs, encoding, [0, 3, 5])   # {column: a value per row}

Nothing is inherited: text.py's Encoded and TextEncoder, image_classification.py's EncodedImages and ImageEncoder
follow this by their shape, which typing checks.
"""

from __future__ import annotations

from typing import Any, Protocol

import pyarrow as pa


class Encoding(Protocol):
    """A slice's rows, prepared: why each row failed (None: it did not), and what each costs in a batch."""

    errors: list[str | None]
    truncated_rows: int  # rows whose input was cut to fit the model

    def length(self, row: int) -> int:
        """The row's cost in the batch budget: its tokens (an image: 1)."""
        ...


class Task(Protocol):
    """One task: its output columns, and the four steps from rows to those columns."""

    columns: dict[str, pa.DataType]  # the task's output columns and their types
    slice_rows: int | None  # rows prepared and handed over at a time; None: the loader's default

    def encode(self, table: pa.Table) -> Encoding:
        """The slice's rows as model inputs, or a reason each bad row fails (run in DataLoader workers)."""
        ...

    def collate(self, encoding: Encoding, rows: list[int]) -> dict[str, Any]:
        """The batch of those rows: tensors ready for the device."""
        ...

    def forward(self, model, inputs: dict[str, Any]) -> Any:
        """The batch through the model (inputs already on its device)."""
        ...

    def decode(self, outputs, inputs: dict[str, Any], encoding: Encoding, rows: list[int]) -> dict[str, list]:
        """The task's columns for those rows, in their order."""
        ...
