"""Parts: assemble one part's results into an Arrow table in row order, and commit it as a Parquet file.

Batches come back length-sorted; results are put back in input order with one vectorised `take`, never row by
row. A part's file appears only complete (store.put writes a hidden temporary, then renames).
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PART_PATTERN = re.compile(r"part-(\d{6})\.parquet")


def part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def committed_parts(names: list[str]) -> set[int]:
    return {int(match[1]) for name in names if (match := PART_PATTERN.fullmatch(name))}


def assemble_part(part, results: list[tuple[list[int], dict]], columns: dict[str, pa.DataType]) -> pa.Table:
    """row_id, kept columns, task columns, error: one row per input row, sorted by row_id.

    `results` holds, per batch, the part positions it covered and its task columns (lists or Arrow arrays).
    Rows without results (failed preprocessing) get nulls in the task columns.
    """
    covered = [position for rows, _ in results for position in rows]
    failed = [row for row, error in enumerate(part.encoded.errors) if error is not None]
    order = np.argsort(np.asarray(covered + failed, dtype=np.int64), kind="stable")
    table = {"row_id": pa.array(np.arange(part.first_row, part.first_row + part.num_rows, dtype=np.int64))}
    for name in part.kept.column_names:
        table[name] = part.kept.column(name)
    for name, kind in columns.items():
        chunks = [_as_array(values[name], kind) for _, values in results]
        chunks.append(pa.nulls(len(failed), kind))
        table[name] = pa.concat_arrays(chunks).take(pa.array(order))
    table["error"] = pa.array(part.encoded.errors, pa.string())
    return pa.table(table)


def _as_array(values, kind: pa.DataType) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        return values if values.type == kind else values.cast(kind)
    return pa.array(values, kind)


def encode_parquet(table: pa.Table, compression: str) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=None if compression == "none" else compression)
    return sink.getvalue().to_pybytes()


def commit_part(store, index: int, table: pa.Table, compression: str) -> None:
    store.put(part_name(index), encode_parquet(table, compression))
