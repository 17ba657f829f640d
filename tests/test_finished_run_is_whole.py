"""A finished run is whole, or it is not reported finished (issue 28): every rerun and `status` compare the parts'
names and sizes with what `_batchrun.json` recorded when the run finished (one listing, no part read). A part deleted
or cut short since is computed again, alone, and `_SUCCESS` written again; until then nothing calls the run complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from jobs import rows, run, write_job
from pipeline_core.cli import run_cli
from pipeline_core.status import run_status

PARTS = 4  # 14 rows in parts of 4


@pytest.fixture
def finished(tmp_path, tiny_models) -> Path:
    job = write_job(tmp_path, tiny_models.text_classifier, rows(14), rows_per_part=4)
    assert run(job) == 0
    return job


def parts_of(job: Path) -> dict[str, int]:
    """{part name: its file's modification time}: a part computed again is a new file."""
    return {path.name: path.stat().st_mtime_ns for path in sorted((job.parent / "out").glob("part-*.parquet"))}


def output(job: Path) -> pd.DataFrame:
    return pd.read_parquet(job.parent / "out").sort_values("row_id").reset_index(drop=True)


def damage(out: Path, how: str) -> None:
    part = out / "part-000001.parquet"
    if how == "deleted":
        part.unlink()
    else:
        os.truncate(part, part.stat().st_size // 2)


def test_a_finished_run_records_the_size_of_every_part(finished):
    info = json.loads((finished.parent / "out" / "_batchrun.json").read_text())
    assert info["part_bytes"] == [(finished.parent / "out" / name).stat().st_size for name in parts_of(finished)]
    assert len(info["part_bytes"]) == PARTS


@pytest.mark.parametrize("how", ["deleted", "cut short"])
def test_status_never_says_complete_while_a_part_is_missing(finished, capsys, how):
    damage(finished.parent / "out", how)
    found = run_status(str(finished.parent / "out"))
    assert (found["complete"], found["changed_since_finished"]) == (False, [1])
    assert run_cli(["status", str(finished.parent / "out")]) == 0
    text = capsys.readouterr().out
    assert not text.splitlines()[0].endswith(", complete")
    assert "incomplete: it finished, but part 1 went missing or changed since; rerun the same command to compute it " \
           "again" in text


@pytest.mark.parametrize("how", ["deleted", "cut short"])
def test_a_rerun_computes_the_missing_part_alone_and_finishes_again(finished, caplog, how):
    before, expected = parts_of(finished), output(finished)
    damage(finished.parent / "out", how)
    assert run(finished) == 0
    assert "was finished, but parts are missing or changed since (parts 1): removing _SUCCESS" in caplog.text
    assert "one process computed 1 parts (4 rows) here" in caplog.text
    after = parts_of(finished)
    assert [name for name in before if after[name] != before[name]] == ["part-000001.parquet"]
    pd.testing.assert_frame_equal(output(finished), expected)
    assert (finished.parent / "out" / "_SUCCESS").exists() and run_status(str(finished.parent / "out"))["complete"]
    caplog.clear()
    assert run(finished) == 0 and "already holds this finished run" in caplog.text  # whole again: nothing to do


def test_a_run_finished_before_sizes_were_recorded_is_checked_by_name(finished, caplog):
    info_file = finished.parent / "out" / "_batchrun.json"
    info = json.loads(info_file.read_text())
    del info["part_bytes"]  # as an older batchrun wrote it: the rows it finished with, no sizes
    info_file.write_text(json.dumps(info))
    assert run_status(str(finished.parent / "out"))["complete"]
    (finished.parent / "out" / "part-000003.parquet").unlink()
    assert not run_status(str(finished.parent / "out"))["complete"]
    assert run(finished) == 0
    assert "one process computed 1 parts (2 rows) here" in caplog.text
    assert output(finished)["row_id"].tolist() == list(range(14))


def test_evaluate_refuses_a_finished_run_that_lost_a_part(tmp_path, tiny_models, capsys):
    data = [{**row, "label": "positive"} for row in rows(8)]
    job = write_job(tmp_path, tiny_models.text_classifier, data, rows_per_part=4,
                    evaluate={"reference_column": "label"})
    assert run(job) == 0
    (tmp_path / "out" / "part-000000.parquet").unlink()
    assert run_cli(["evaluate", str(tmp_path / "out")]) == 2
    assert "parts 0 went missing or changed since the run finished; rerun the job" in capsys.readouterr().err


def test_shards_recompute_only_their_own_missing_parts(tmp_path, tiny_models, caplog):
    job = write_job(tmp_path, tiny_models.text_classifier, rows(14), rows_per_part=4)
    assert run(job, "--num-shards", "2", "--shard-index", "0") == 0
    assert run(job, "--num-shards", "2", "--shard-index", "1") == 0
    expected = output(job)
    (tmp_path / "out" / "part-000003.parquet").unlink()  # shard 1's block is parts 2 and 3
    caplog.clear()
    assert run(job, "--num-shards", "2", "--shard-index", "0") == 0
    assert "computed 0 parts" in caplog.text and not (tmp_path / "out" / "_SUCCESS").exists()
    assert not run_status(str(tmp_path / "out"))["complete"]
    caplog.clear()
    assert run(job, "--num-shards", "2", "--shard-index", "1") == 0
    assert "computed 1 parts (2 rows) here" in caplog.text and "wrote _SUCCESS" in caplog.text
    pd.testing.assert_frame_equal(output(job), expected)
