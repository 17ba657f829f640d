"""What reading one part of a Parquet input costs: the datasets stream (which reads every part before it) against
batchrun's row-group reader (which reads only the row groups that hold the part).

Input: 600,000 rows of short text (5 to 40 words each, seeded) in 6 local Parquet files written with pyarrow's
default row groups, read with rows_per_part 50,000 (12 parts). It prints:
  (a) the time to get part 11's table: through the datasets stream (skipping parts 0-10) and through the reader
      (opening the footers, then reading the part), the best of --repeats runs each, and their ratio;
  (b) the row groups, rows and compressed bytes the reader reads for "shard 0 of 6" (parts 0-1) against all parts.

Runs on a CPU in about a minute:
    python benchmarks/parquet_reads.py
    python benchmarks/parquet_reads.py --row-group-size 10000 --repeats 1
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline_core.data.source import Split, open_split  # noqa: E402
from pipeline_core.manifest import Job  # noqa: E402

ROWS, FILES, ROWS_PER_PART, TARGET_PART = 600_000, 6, 50_000, 11
SHARD_PARTS = range(0, 2)  # shard 0 of 6: the first sixth of the 12 parts


def write_input(folder: Path, row_group_size: int | None) -> list[str]:
    words = [f"w{index}" for index in range(5000)]
    rng = random.Random(0)
    per_file = ROWS // FILES
    paths = []
    for file in range(FILES):
        texts = [" ".join(rng.choices(words, k=rng.randint(5, 40))) for _ in range(per_file)]
        path = folder / f"part-{file:02d}.parquet"
        pq.write_table(pa.table({"id": range(file * per_file, (file + 1) * per_file), "text": texts}), path,
                       row_group_size=row_group_size)
        paths.append(str(path))
    return paths


def make_job(paths: list[str]) -> Job:
    return Job(Path("job.yaml"), {
        "task": "text-classification", "model": {"prompt": None},
        "dataset": {"path": "parquet", "name": None, "data_files": paths, "split": "train", "revision": None,
                    "streaming": True, "input_column": "text", "image_column": "image", "keep_columns": ["id"]},
        "evaluate": {"reference_column": None, "metrics": None},
    })


def part_by_stream(paths: list[str]) -> pa.Table:
    """What open_split gave before the reader: the datasets stream, skipping the parts before the wanted one."""
    rows = datasets.load_dataset("parquet", data_files=paths, split="train", streaming=True)
    split = Split(rows.select_columns(["text", "id"]).with_format("arrow"), None, ["text", "id"])
    return next(table for _, table in split.parts(ROWS_PER_PART, lambda index: index == TARGET_PART))


def part_by_reader(paths: list[str]) -> pa.Table:
    return open_split(make_job(paths)).read_part(TARGET_PART, ROWS_PER_PART)


def best_time(read, paths: list[str], repeats: int) -> tuple[float, pa.Table]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        table = read(paths)
        times.append(time.perf_counter() - start)
    return min(times), table


def shard_reads(paths: list[str]) -> None:
    shard, whole = open_split(make_job(paths)), open_split(make_job(paths))
    for index in SHARD_PARTS:
        shard.read_part(index, ROWS_PER_PART)
    list(whole.parts(ROWS_PER_PART, lambda index: True))
    mine, every = shard.reads(), whole.reads()
    print(f"(b) shard 0 of 6 (parts {SHARD_PARTS.start}-{SHARD_PARTS.stop - 1}): {mine.row_groups} row groups, "
          f"{mine.rows:,} rows, {mine.bytes:,} bytes")
    print(f"    all 12 parts:           {every.row_groups} row groups, {every.rows:,} rows, {every.bytes:,} bytes")
    print(f"    shard / all: {mine.bytes / every.bytes:.3f} of the bytes, {mine.rows / every.rows:.3f} of the rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row-group-size", type=int, default=None, help="rows per row group (pyarrow's default)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        paths = write_input(Path(folder), args.row_group_size)
        footer = pq.read_metadata(paths[0])
        size = sum(Path(path).stat().st_size for path in paths)
        print(f"input: {ROWS:,} rows in {FILES} files, {size:,} bytes on disk, {footer.num_row_groups} row group(s) "
              f"of {footer.row_group(0).num_rows:,} rows per file; rows_per_part {ROWS_PER_PART:,}")
        streamed, expected = best_time(part_by_stream, paths, args.repeats)
        direct, table = best_time(part_by_reader, paths, args.repeats)
        assert table.equals(expected), "the reader's part differs from the stream's"
        reader = open_split(make_job(paths))
        reader.read_part(TARGET_PART, ROWS_PER_PART)
        read = reader.reads()
        print(f"(a) part {TARGET_PART}: datasets stream {streamed:.3f}s, reader {direct:.3f}s (open + read), "
              f"{streamed / direct:.1f}x faster; the reader read {read.row_groups} row group(s), {read.rows:,} rows, "
              f"{read.bytes:,} bytes")
        shard_reads(paths)


if __name__ == "__main__":
    main()
