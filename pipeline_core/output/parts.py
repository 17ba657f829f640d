"""Parts: assemble one part's results into an Arrow table in row order, and commit it as a Parquet file.

Batches come back length-sorted; results are put back in input order with one vectorised `take`, never row by
row. A part's file appears only complete (store.put writes a hidden temporary, then renames).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PART_PATTERN = re.compile(r"part-(\d{6})\.parquet")


def part_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


def committed_parts(names: list[str]) -> set[int]:
    return {int(match[1]) for name in names if (match := PART_PATTERN.fullmatch(name))}


def part_sizes(store, total: int) -> list[int]:
    """The bytes of parts 0 to total-1, from one listing: what a finished run records, to be checked on reruns."""
    sizes = store.sizes()
    return [sizes[part_name(index)] for index in range(total)]


def changed_since_finished(store, info: dict) -> list[int]:
    """Parts of a finished run that are missing, or whose size differs, from what `_batchrun.json` recorded when it
    finished: one listing, no part read. A run finished by a batchrun that recorded no sizes is checked by name,
    for the parts its recorded rows fill."""
    sizes = store.sizes()
    recorded = info.get("part_bytes")
    if isinstance(recorded, list):
        return [index for index, size in enumerate(recorded) if sizes.get(part_name(index)) != size]
    rows, rows_per_part = info.get("rows"), (info.get("identity") or {}).get("output.rows_per_part")
    if not isinstance(rows, int) or not isinstance(rows_per_part, int) or rows_per_part < 1:
        return []
    return [index for index in range(-(-rows // rows_per_part)) if part_name(index) not in sizes]


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


def commit_part(store, index: int, table: pa.Table, compression: str, fingerprint: str,
                evaluation: dict | None = None) -> None:
    """`evaluation`: the part's statistics for the run's scores (evaluation.py), committed with its rows."""
    first_row = table.column("row_id")[0].as_py() if table.num_rows else -1
    failed = table.num_rows - table.column("error").null_count
    facts = {"fingerprint": fingerprint, "part": index, "first_row": first_row, "rows": table.num_rows,
             "failed_rows": failed}
    if evaluation is not None:
        facts["evaluation"] = json.dumps(evaluation, separators=(",", ":"))
    store.put(part_name(index), encode_parquet(table, compression, facts))


def read_part_columns(store, index: int, columns: list[str]) -> pa.Table:
    """Some columns of a committed part's rows."""
    with store.open(part_name(index)) as file:
        return pq.read_table(file, columns=columns)


@dataclass
class PartFacts:
    index: int
    rows: int
    failed_rows: int
    evaluation: dict | None = None  # the part's evaluation statistics, when the run is scored


def _evaluation(raw: str | None) -> dict | None:
    try:
        stats = json.loads(raw) if raw is not None else None
    except ValueError:
        return None  # unreadable: the part's statistics are computed again from its rows
    return stats if isinstance(stats, dict) else None


def read_part_facts(store, index: int, fingerprint: str, rows_per_part: int,
                    split_start: int | None = 0) -> PartFacts | None:
    """What a committed part's footer says, or None when the file is unreadable, truncated or not this run's.
    `split_start`: the row id of the split's first row (`train[10:50]` starts at 10), which fixes each part's first
    row id; None where the split is not open (status, a finished run's exit code) and it is not checked."""
    try:
        with store.open(part_name(index)) as file:
            metadata = pq.read_metadata(file).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    facts = {key.decode().removeprefix("batchrun."): value.decode() for key, value in metadata.items()
             if key.startswith(b"batchrun.")}
    try:
        rows, first_row = int(facts["rows"]), int(facts["first_row"])
        valid = (facts["fingerprint"] == fingerprint and int(facts["part"]) == index
                 and 0 < rows <= rows_per_part
                 and (split_start is None or first_row == split_start + index * rows_per_part))
        if not valid:
            return None
        return PartFacts(index, rows, int(facts["failed_rows"]), _evaluation(facts.get("evaluation")))
    except (KeyError, ValueError):
        return None
