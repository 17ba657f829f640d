"""Parts: assemble one part's results into an Arrow table in row order, and encode it as Parquet bytes.

Batches come back length-sorted; results are put back in input order with one vectorised `take`, never row by
row. run_dir.commit_part writes the bytes, which appear only complete (store.put writes a hidden temporary, then
renames).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


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


def encode_parquet(table: pa.Table, compression: str, facts: dict) -> bytes:
    """Parquet bytes; `facts` go into the footer, where resume and status read them without reading rows."""
    metadata = dict(table.schema.metadata or {})
    metadata.update({f"batchrun.{key}".encode(): str(value).encode() for key, value in facts.items()})
    sink = pa.BufferOutputStream()
    codec = None if compression == "none" else compression
    pq.write_table(table.replace_schema_metadata(metadata), sink, compression=codec)
    return sink.getvalue().to_pybytes()
