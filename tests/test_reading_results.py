"""Reading results (docs/reading-results.md): pyarrow, pandas, DuckDB, polars and datasets, each as that page shows
it, over a real finished run whose OUTPUT also holds the files batchrun and its other features write beside the
parts (`_batchrun.json`, `_progress.json`, `_SUCCESS`, metrics, a report folder, worker records, claims, a temporary
of a part being written), each reader giving exactly the parts' rows: the same row ids, once each, nothing else.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

import jobs
from jobs import rows, run

COLUMNS = ["row_id", "id", "label", "score", "error"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_models) -> tuple[Path, pa.Table]:
    """OUTPUT of a finished run of 10 rows in 4 parts, with files other features write beside the parts, and the
    parts' own rows, read one file at a time."""
    job = jobs.write_job(tmp_path_factory.mktemp("finished"), tiny_models.text_classifier, rows(10), rows_per_part=3)
    assert run(job) == 0
    out = job.parent / "out"
    parts = pa.concat_tables([pq.read_table(path) for path in sorted(out.glob("part-*.parquet"))])
    (out / "_metrics-000000.json").write_text('{"rows_per_second": [1, 2]}')
    (out / "_eval.json").write_text('{"metrics": {}}')
    (out / "_report").mkdir()
    (out / "_report" / "report.html").write_text("<html></html>")
    (out / "_report" / "throughput.png").write_bytes(b"\x89PNG\r\n")
    (out / ".worker-x.json").write_text('{"worker": "x"}')
    (out / ".claim-000001.0").write_text('{"worker": "x"}')
    # a part being written by a live process: complete Parquet under its hidden temporary name, not yet renamed
    shutil.copy(out / "part-000001.parquet", out / ".part-000004.parquet.tmp-node-1-4242-0123abcd")
    return out, parts


def test_the_output_holds_the_parts_and_the_other_files(finished):
    out, parts = finished
    assert sorted(path.name for path in out.iterdir()) == [
        ".claim-000001.0", ".part-000004.parquet.tmp-node-1-4242-0123abcd", ".worker-x.json", "_SUCCESS",
        "_batchrun.json", "_eval.json", "_metrics-000000.json", "_metrics-000001.json", "_metrics-000002.json",
        "_metrics-000003.json", "_progress.json", "_report",
        "part-000000.parquet", "part-000001.parquet", "part-000002.parquet", "part-000003.parquet"]
    assert parts.column_names == COLUMNS and parts.column("row_id").to_pylist() == list(range(10))


def readers(out: Path) -> dict:
    """Each reader as docs/reading-results.md shows it: {name: a function giving a pandas frame}."""
    return {
        "pyarrow": lambda: pads.dataset(out).to_table().to_pandas(),
        "pandas": lambda: pd.read_parquet(out),
        "duckdb": lambda: duckdb.sql(f"SELECT * FROM read_parquet('{out}/*.parquet') ORDER BY row_id").df(),
        "duckdb part-*": lambda: duckdb.sql(f"SELECT * FROM read_parquet('{out}/part-*.parquet')").df(),
        "polars": lambda: pl.read_parquet(f"{out}/*.parquet").to_pandas(),
        "datasets": lambda: datasets.load_dataset("parquet", data_files=f"{out}/*.parquet", split="train").to_pandas(),
    }


@pytest.mark.parametrize("reader", ["pyarrow", "pandas", "duckdb", "duckdb part-*", "polars", "datasets"])
def test_each_reader_gives_exactly_the_parts_rows(finished, reader):
    out, parts = finished
    frame = readers(out)[reader]()
    assert list(frame.columns) == COLUMNS
    assert sorted(frame["row_id"]) == list(range(10))  # every row once: no part twice, no temporary, no side file
    expected = parts.to_pandas()
    frame = frame.sort_values("row_id", ignore_index=True)
    assert list(frame["id"]) == list(expected["id"]) and list(frame["label"]) == list(expected["label"])
    assert list(frame["score"]) == pytest.approx(list(expected["score"]))


def test_no_file_batchrun_writes_beside_the_parts_ends_in_parquet(finished, tmp_path):
    """Why: the globs of DuckDB, polars and datasets take `_x.parquet` (and DuckDB and polars `.x.parquet`) where
    pyarrow and pandas skip them, so a side file named `*.parquet` would leak into `OUTPUT/*.parquet`."""
    out, _ = finished
    names = [path.name for path in out.iterdir()]
    assert [name for name in names if name.endswith(".parquet")] == [name for name in names
                                                                     if name.startswith("part-")]
    shutil.copytree(out, tmp_path / "out")
    shutil.copy(out / "part-000000.parquet", tmp_path / "out" / "_side.parquet")
    assert len(pd.read_parquet(tmp_path / "out")) == 10
    assert len(duckdb.sql(f"SELECT * FROM read_parquet('{tmp_path}/out/*.parquet')").df()) == 13
    assert len(duckdb.sql(f"SELECT * FROM read_parquet('{tmp_path}/out/part-*.parquet')").df()) == 10
