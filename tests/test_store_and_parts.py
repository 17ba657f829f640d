"""The store's atomic writes (fsync, hidden temporary, rename, directory fsync), part footers and how resume
checks them, and the run's identity: which manifest keys change the fingerprint and which may change freely.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import manifest, output, rows, run, write_job, write_manifest
from pipeline_core.identity import job as identity_job
from pipeline_core.identity.keys import PROVENANCE_KEYS, differences, fingerprint
from pipeline_core.manifest import load_job
from pipeline_core.manifest.spec import KEYS
from pipeline_core.output import store as store_module
from pipeline_core.output.parts import encode_parquet
from pipeline_core.output.run_dir import PartFacts, commit_part, committed_parts, part_name, read_part_facts
from pipeline_core.output.store import LocalStore

FINGERPRINT = "0123456789abcdef"


# --- the store ---------------------------------------------------------------------------------------------------


@pytest.fixture
def disk_calls(monkeypatch) -> list[tuple]:
    """Every fsync (with what kind of file it reached) and rename the store makes, in order, with what the
    rename's source and target held at that moment."""
    calls = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(descriptor):
        found = os.fstat(descriptor)
        kind = "file" if stat.S_ISREG(found.st_mode) else "directory" if stat.S_ISDIR(found.st_mode) else "other"
        calls.append(("fsync", kind, found.st_ino, found.st_size))
        return real_fsync(descriptor)

    def renaming(real):
        def rename(source, target, *args, **kwargs):
            source, target = Path(source), Path(target)
            calls.append(("rename", source, source.stat().st_ino, source.read_bytes(), target,
                          target.read_bytes() if target.exists() else None))
            return real(source, target, *args, **kwargs)
        return rename

    monkeypatch.setattr(store_module.os, "fsync", fsync)
    monkeypatch.setattr(store_module.os, "replace", renaming(real_replace))
    monkeypatch.setattr(store_module.os, "rename", renaming(real_rename))
    return calls


@pytest.mark.parametrize("old", [None, b"the old complete part"], ids=["new", "overwrite"])
def test_put_fsyncs_a_hidden_temporary_renames_it_into_place_then_fsyncs_the_directory(tmp_path, disk_calls, old):
    if old is not None:
        (tmp_path / "part-000003.parquet").write_bytes(old)
    data = b"the new complete part, longer than the old one"
    LocalStore(tmp_path).put("part-000003.parquet", data)

    steps = [f"fsync {call[1]}" if call[0] == "fsync" else "rename" for call in disk_calls]
    assert steps == ["fsync file", "rename", "fsync directory"]
    (_, _, synced_inode, synced_size), renamed, (_, _, directory_inode, _) = disk_calls
    _, source, source_inode, source_bytes, target, target_bytes = renamed
    assert source.parent == tmp_path and source.name.startswith(".")  # hidden from Parquet readers
    assert (synced_inode, synced_size) == (source_inode, len(data))  # the bytes were on disk before the rename
    assert source_bytes == data
    assert target == tmp_path / "part-000003.parquet"
    assert target_bytes == old  # until the rename, readers see nothing or the old whole file
    assert directory_inode == tmp_path.stat().st_ino
    assert (tmp_path / "part-000003.parquet").read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == ["part-000003.parquet"]


def test_create_refuses_a_name_that_exists(tmp_path):
    store = LocalStore(tmp_path / "out")
    assert store.create(".claim-000000.0", b"first") is True
    assert store.create(".claim-000000.0", b"second") is False
    assert (tmp_path / "out" / ".claim-000000.0").read_bytes() == b"first"
    assert store.get(".claim-000000.0") == b"first" and store.get("missing") is None


def test_committed_parts_are_the_part_files_only():
    names = ["_SUCCESS", "_batchrun.json", ".part-000003.parquet.tmp-77", "part-000000.parquet",
             "part-000012.parquet", "part-1.parquet", "part-000002.parquet.bak"]
    assert committed_parts(names) == {0, 12}


# --- part footers --------------------------------------------------------------------------------------------------


def part_table(first_row: int, count: int, errors: dict[int, str] | None = None) -> pa.Table:
    errors = errors or {}
    return pa.table({
        "row_id": pa.array(range(first_row, first_row + count), pa.int64()),
        "label": pa.array([None if i in errors else "positive" for i in range(count)], pa.string()),
        "error": pa.array([errors.get(i) for i in range(count)], pa.string()),
    })


def test_committed_part_reads_back_its_rows_and_failed_rows(tmp_path):
    store = LocalStore(tmp_path)
    table = part_table(8, 4, errors={1: "input column 'text' is null", 3: "forward pass failed"})
    commit_part(store, 2, table, "zstd", FINGERPRINT)
    assert read_part_facts(store, 2, FINGERPRINT, rows_per_part=4) == PartFacts(2, 4, 2)
    assert pq.read_table(tmp_path / "part-000002.parquet").equals(table)


def test_last_part_may_be_shorter_than_rows_per_part(tmp_path):
    store = LocalStore(tmp_path)
    commit_part(store, 3, part_table(12, 1), "none", FINGERPRINT)
    assert read_part_facts(store, 3, FINGERPRINT, rows_per_part=4) == PartFacts(3, 1, 0)


GOOD_FACTS = {"fingerprint": FINGERPRINT, "part": 2, "first_row": 8, "rows": 4, "failed_rows": 0}


def test_footer_written_by_hand_with_the_right_facts_is_accepted(tmp_path):
    """The baseline of the next test: each of its footers differs from this one in one fact only."""
    store = LocalStore(tmp_path)
    store.put(part_name(2), encode_parquet(part_table(8, 4), "zstd", GOOD_FACTS))
    assert read_part_facts(store, 2, FINGERPRINT, rows_per_part=4) == PartFacts(2, 4, 0)


@pytest.mark.parametrize("change", [
    {"fingerprint": "fedcba9876543210"},  # a part of another run
    {"part": 1},  # a part file renamed to another index
    {"first_row": 9},
    {"first_row": 4},
    {"rows": 0},
    {"rows": 5},  # more rows than a part holds
    {"rows": "four"},
    {"fingerprint": None},  # no fingerprint at all
    {"failed_rows": None},
], ids=lambda change: "-".join(f"{key}={value}" for key, value in change.items()))
def test_part_whose_footer_does_not_match_is_not_taken_as_committed(tmp_path, change):
    facts = {key: value for key, value in {**GOOD_FACTS, **change}.items() if value is not None}
    store = LocalStore(tmp_path)
    store.put(part_name(2), encode_parquet(part_table(8, 4), "zstd", facts))
    assert read_part_facts(store, 2, FINGERPRINT, rows_per_part=4) is None


def test_part_renamed_to_another_index_is_not_taken_as_committed(tmp_path):
    store = LocalStore(tmp_path)
    commit_part(store, 2, part_table(8, 4), "zstd", FINGERPRINT)
    for index in (1, 3):
        shutil.copy(tmp_path / part_name(2), tmp_path / part_name(index))
        assert read_part_facts(store, index, FINGERPRINT, rows_per_part=4) is None
    assert read_part_facts(store, 2, FINGERPRINT, rows_per_part=4) == PartFacts(2, 4, 0)


@pytest.mark.parametrize("damage", ["not-parquet", "truncated", "no-batchrun-footer", "missing"])
def test_unreadable_or_unlabelled_part_is_not_taken_as_committed(tmp_path, damage):
    store = LocalStore(tmp_path)
    commit_part(store, 0, part_table(0, 4), "zstd", FINGERPRINT)
    path = tmp_path / part_name(0)
    if damage == "not-parquet":
        path.write_bytes(b"row_id,label\n0,positive\n")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-30])
    elif damage == "no-batchrun-footer":
        pq.write_table(part_table(0, 4), path)
    else:
        path.unlink()
    assert read_part_facts(store, 0, FINGERPRINT, rows_per_part=4) is None


def test_foreign_part_of_the_same_shape_is_redone_and_the_other_parts_are_kept(tmp_path, tiny_models):
    data = rows(12)
    job = write_job(tmp_path / "mine", tiny_models.text_classifier, data)
    other = write_job(tmp_path / "other", tiny_models.text_classifier, data)
    assert run(job) == 0 and run(other, "--set", "batching.max_length=3") == 0
    expected, foreign = output(job), output(other)
    assert list(foreign["row_id"]) == list(expected["row_id"])
    assert not foreign["score"][4:8].equals(expected["score"][4:8])  # else swapping the part proves nothing

    out = tmp_path / "mine" / "out"
    shutil.copy(tmp_path / "other" / "out" / part_name(1), out / part_name(1))
    (out / "_SUCCESS").unlink()
    kept = {index: (out / part_name(index)).stat() for index in (0, 2)}
    assert run(job) == 0
    pd.testing.assert_frame_equal(output(job), expected)
    for index, before in kept.items():
        after = (out / part_name(index)).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    mine = json.loads((out / "_batchrun.json").read_text())["fingerprint"]
    assert pq.read_metadata(out / part_name(1)).metadata[b"batchrun.fingerprint"] == mine.encode()
    assert (out / "_SUCCESS").exists()


# --- the run's identity --------------------------------------------------------------------------------------------

# Every key that changes output values, each with an override giving it another value than BASE_JOB's.
IDENTITY_CHANGES = {
    "task": "task=summarization",
    "evaluate.reference_column": "evaluate.reference_column=text",  # carried into the output
    "model.name": "model.name=another-model",
    "model.revision": "model.revision=v2",
    "model.dtype": "model.dtype=float16",
    "model.prompt": "model.prompt=Q {text}",
    "model.chat_template": "model.chat_template=true",
    "model.generation": "model.generation.max_new_tokens=7",
    "batching.max_length": "batching.max_length=16",
    "dataset.path": "dataset.path=csv",
    "dataset.name": "dataset.name=another-configuration",
    "dataset.data_files": "dataset.data_files=other.jsonl",
    "dataset.options": "dataset.options.encoding=latin-1",  # how the files are parsed
    "dataset.split": "dataset.split=test",
    "dataset.revision": "dataset.revision=v2",
    "dataset.input_column": "dataset.input_column=body",
    "dataset.image_column": "dataset.image_column=picture",
    "dataset.keep_columns": "dataset.keep_columns=[id, author]",
    "output.rows_per_part": "output.rows_per_part=7",
}
# Keys only feature-extraction reads, changed from a feature-extraction job (EMBEDDING_JOB) of a model without
# sentence-transformers modules; test_embedding.py changes them, and the two below, on a checkpoint with modules.
EMBEDDING_CHANGES = {
    "model.pooling": "model.pooling=cls",
    "model.normalize": "model.normalize=true",
}
# They enter the identity as the embedding settings they resolve to, which only a checkpoint with modules changes.
RESOLVED_BY_THE_CHECKPOINT = {"model.prompt_name", "model.sentence_transformers"}
# What docs/output.md (batch sizes, worker counts, the device) and identity.py (devices) say may change between
# attempts.
FREE_CHANGES = {
    "batching.max_batch_size": "batching.max_batch_size=3",
    "batching.max_tokens": "batching.max_tokens=999",
    "batching.num_workers": "batching.num_workers=5",
    "model.device": "model.device=cuda:1",
    "model.device_map": "model.device_map=auto",
    # credentials rotate and endpoints move between attempts; the bytes read and written stay the same
    "output.storage_options": "output.storage_options={key: rotated, secret: rotated}",
    "dataset.storage_options": "dataset.storage_options={endpoint_url: 'http://127.0.0.1:9000'}",
}
# Neither claimed to change values nor claimed free; listed so that a new manifest key forces a decision here.
OUTSIDE_THE_IDENTITY = {"name", "model.trust_remote_code", "dataset.streaming", "output.path", "output.compression",
                        "errors.on_error", "errors.max_error_rate",
                        # which scores a run reports: parts whose footers lack a metric's figures are scored from
                        # their rows (test_evaluation.py::test_metrics_added_on_resume_...)
                        "evaluate.metrics"}
# model.engine: a server engine's keys enter the identity as one entry, `model.engine` (engines/served.py); the
# transformers engine adds none, so runs recorded before server engines keep their fingerprint.
ENGINE_CHANGES = {
    "model.engine.kind": ("model.engine.kind=vllm", "model.engine.command=null"),
    "model.engine.command": ("model.engine.command=[serve2, '{model}', --port, '{port}']",),
    "model.engine.args": ("model.engine.args=[--dtype, bfloat16]",),
    "model.engine.api": ("model.engine.api=chat",),
    "model.engine.request": ("model.engine.request.seed=3",),
}
# the URL (a run may move to another endpoint of the same model: test_server_engines.py), the credentials and how
# requests are sent
ENGINE_FREE = {
    "model.engine.api_key": "model.engine.api_key=rotated",
    "model.engine.headers": "model.engine.headers={X-Team: rotated}",
    "model.engine.max_concurrency": "model.engine.max_concurrency=3",
    "model.engine.request_timeout": "model.engine.request_timeout=5",
    "model.engine.retries": "model.engine.retries=1",
    "model.engine.restarts": "model.engine.restarts=0",
    "model.engine.startup_timeout": "model.engine.startup_timeout=60",
}
ENGINE_BY_URL = {"model.engine.url"}
BASE_JOB = manifest("tiny-model", task="text-generation", model={"generation": {"max_new_tokens": 4}},
                    dataset={"path": "json", "data_files": "rows.jsonl", "keep_columns": ["id"]})


EMBEDDING_JOB = manifest("tiny-model", task="feature-extraction", dataset={"path": "json", "data_files": "rows.jsonl"})


def job_identity(tmp_path: Path, *overrides: str, limit: int | None = None, base: dict = BASE_JOB) -> dict:
    """The identity of the manifest's keys: the model's and input's provenance, which follow the files a key
    names, are test_provenance.py's."""
    path = write_manifest(tmp_path / "job.yaml", base)
    for name in ("rows.jsonl", "other.jsonl"):  # the data files the jobs name, relative to the working directory
        (tmp_path / name).write_text('{"id": "r0", "text": "the fox"}\n')
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        values = identity_job.job_identity(load_job(path, list(overrides)), limit)[0]
    finally:
        os.chdir(cwd)
    return {key: value for key, value in values.items() if key not in PROVENANCE_KEYS}


def test_every_manifest_key_is_either_in_the_identity_free_or_listed_outside_it():
    listed = set(IDENTITY_CHANGES) | set(EMBEDDING_CHANGES) | RESOLVED_BY_THE_CHECKPOINT | set(FREE_CHANGES) \
        | OUTSIDE_THE_IDENTITY | set(ENGINE_CHANGES) | set(ENGINE_FREE) | ENGINE_BY_URL
    assert {key.path for key in KEYS} == listed


ENGINE_JOB = manifest("tiny-model", task="text-generation", model={
    "generation": {"max_new_tokens": 4}, "engine": {"kind": "server", "command": ["serve", "{model}", "{port}"]}},
    dataset={"path": "json", "data_files": "rows.jsonl"})


def engine_identity(tmp_path: Path, *overrides: str) -> dict:
    """The `model.engine` entry of a started server's identity (no server is started for it)."""
    from pipeline_core.engines.served import served_identity
    from pipeline_core.initializer.preview import ModelPreview

    job = load_job(write_manifest(tmp_path / "engine.yaml", ENGINE_JOB), list(overrides))
    return {"model.engine": served_identity(job, ModelPreview(None))}


@pytest.mark.parametrize("key", sorted(ENGINE_CHANGES))
def test_changing_a_server_engine_key_changes_the_fingerprint(tmp_path, key):
    base, changed = engine_identity(tmp_path), engine_identity(tmp_path, *ENGINE_CHANGES[key])
    assert fingerprint(changed) != fingerprint(base)
    assert [line.split(": ")[0] for line in differences(base, changed)] == ["model.engine"]


@pytest.mark.parametrize("key", sorted(ENGINE_FREE))
def test_credentials_and_how_requests_are_sent_leave_the_fingerprint_alone(tmp_path, key):
    assert fingerprint(engine_identity(tmp_path, ENGINE_FREE[key])) == fingerprint(engine_identity(tmp_path))


def test_the_transformers_engine_adds_nothing_to_the_identity(tmp_path):
    assert "model.engine" not in job_identity(tmp_path)
    assert job_identity(tmp_path, "model.engine.max_concurrency=3") == job_identity(tmp_path)


@pytest.mark.parametrize("key", sorted(IDENTITY_CHANGES))
def test_changing_one_identity_key_changes_the_fingerprint_and_names_that_key(tmp_path, key):
    base = job_identity(tmp_path)
    changed = job_identity(tmp_path, IDENTITY_CHANGES[key])
    assert fingerprint(changed) != fingerprint(base)
    assert [line.split(": ")[0] for line in differences(base, changed)] == [key]


@pytest.mark.parametrize("key", sorted(EMBEDDING_CHANGES))
def test_changing_an_embedding_key_changes_a_feature_extraction_fingerprint(tmp_path, key):
    base = job_identity(tmp_path, base=EMBEDDING_JOB)
    changed = job_identity(tmp_path, EMBEDDING_CHANGES[key], base=EMBEDDING_JOB)
    assert fingerprint(changed) != fingerprint(base)
    assert [line.split(": ")[0] for line in differences(base, changed)] == [key]


def test_embedding_keys_keep_the_identity_older_runs_recorded(tmp_path):
    # Before the defaults became "from the checkpoint", every run recorded pooling mean and normalize false: a run
    # of another task, or of a model without modules, resumes with what it recorded.
    for base in (BASE_JOB, EMBEDDING_JOB):
        values = job_identity(tmp_path, base=base)
        assert (values["model.pooling"], values["model.normalize"]) == ("mean", False)
        assert "embedding" not in values


@pytest.mark.parametrize("old, new", [(None, 10), (10, 11), (10, None)])
def test_changing_the_limit_changes_the_fingerprint_and_names_limit(tmp_path, old, new):
    base, changed = job_identity(tmp_path, limit=old), job_identity(tmp_path, limit=new)
    assert fingerprint(changed) != fingerprint(base)
    assert differences(base, changed) == [f"limit: {json.dumps(old)} -> {json.dumps(new)}"]


@pytest.mark.parametrize("key", sorted(FREE_CHANGES))
def test_batching_workers_and_device_may_change_without_changing_the_fingerprint(tmp_path, key):
    base = job_identity(tmp_path)
    changed = job_identity(tmp_path, FREE_CHANGES[key])
    assert fingerprint(changed) == fingerprint(base)
    assert differences(base, changed) == []


def test_fingerprint_is_stable_across_loads_and_insensitive_to_key_order(tmp_path):
    first = job_identity(tmp_path, "model.generation.do_sample=false", "model.generation.num_beams=1")
    second = job_identity(tmp_path, "model.generation.num_beams=1", "model.generation.do_sample=false")
    assert fingerprint(first) == fingerprint(second)
    assert len(fingerprint(first)) == 16 and int(fingerprint(first), 16) >= 0


@pytest.fixture
def finished_generation(tmp_path, tiny_models, capsys) -> Path:
    job = write_job(tmp_path, tiny_models.causal_lm, rows(4), task="text-generation", rows_per_part=2,
                    model={"generation": {"max_new_tokens": 2, "do_sample": False}})
    assert run(job) == 0
    capsys.readouterr()
    return job


def reported_differences(err: str) -> list[str]:
    return [line.removeprefix("  - ") for line in err.splitlines() if line.startswith("  - ")]


def test_rerun_with_other_generation_settings_exits_2_naming_model_generation(finished_generation, capsys):
    before = sorted(os.listdir(finished_generation.parent / "out"))
    assert run(finished_generation, "--set", "model.generation.max_new_tokens=3") == 2
    err = capsys.readouterr().err
    assert "holds a run of a different job" in err
    assert reported_differences(err) == [
        'model.generation: {"max_new_tokens": 2, "do_sample": false} -> {"max_new_tokens": 3, "do_sample": false}'
    ]
    assert sorted(os.listdir(finished_generation.parent / "out")) == before


def test_rerun_with_another_limit_exits_2_naming_limit(finished_generation, capsys):
    assert run(finished_generation, "--limit", "3") == 2
    assert reported_differences(capsys.readouterr().err) == ["limit: null -> 3"]


# --- the store's other methods and part assembly --------------------------------------------------------------------


def test_store_names_its_directory_and_creates_it_with_its_parents(tmp_path):
    root = tmp_path / "a" / "b"
    store = LocalStore(root)
    assert str(store) == str(root)
    assert store.names() == []  # not created yet
    store.put("_SUCCESS", b"")
    store.put("_SUCCESS", b"again")  # the directory exists now
    assert LocalStore(tmp_path / "c" / "d").create(".claim-000000.0", b"x") is True
    assert LocalStore(tmp_path / "c" / "d").create(".other", b"y") is True


def test_store_names_are_the_files_only_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b", "_a", ".c"):
        (tmp_path / name).write_text(name)
    assert LocalStore(tmp_path).names() == [".c", "_a", "b"]


def test_remove_of_a_missing_name_is_quiet(tmp_path):
    store = LocalStore(tmp_path)
    store.put("x", b"1")
    store.remove("x")
    store.remove("x")
    assert store.names() == [] and store.exists("x") is False


def test_put_writes_under_a_hidden_temporary_named_after_the_target_the_process_and_a_random_suffix(tmp_path,
                                                                                                    disk_calls):
    """Unique per write: processes on other hosts (same pid, maybe) and this process's heartbeat thread may put the
    same name at the same moment, and must not write into one temporary."""
    store = LocalStore(tmp_path)
    store.put("_batchrun.json", b"{}")
    store.put("_batchrun.json", b"{}")
    temporaries = [call[1].name for call in disk_calls if call[0] == "rename"]
    assert len(temporaries) == 2 and temporaries[0] != temporaries[1]
    for name in temporaries:
        assert re.fullmatch(rf"\._batchrun\.json\.tmp-{re.escape(socket.gethostname())}-{os.getpid()}-[0-9a-f]{{8}}",
                            name), name
    assert sorted(os.listdir(tmp_path)) == ["_batchrun.json"]


def test_age_is_the_seconds_since_the_last_write_and_0_for_a_missing_name(tmp_path):
    store = LocalStore(tmp_path)
    store.put("x", b"1")
    assert 0 <= store.age("x") < 5
    an_hour_ago = time.time() - 3600
    os.utime(tmp_path / "x", (an_hour_ago, an_hour_ago))
    assert 3599 < store.age("x") < 3605
    future = time.time() + 3600  # a clock ahead on the host that wrote it: never a negative age
    os.utime(tmp_path / "x", (future, future))
    assert store.age("x") == 0.0
    assert store.age("missing") == 0.0


def test_created_claim_file_is_readable_by_others_and_not_executable(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    LocalStore(tmp_path).create(".claim-000000.0", b"x")
    assert stat.S_IMODE((tmp_path / ".claim-000000.0").stat().st_mode) == 0o644 & ~umask


def test_footer_keeps_the_tables_own_metadata_and_compression_none_is_uncompressed(tmp_path):
    table = part_table(0, 2).replace_schema_metadata({b"origin": b"test"})
    for compression, codec in (("none", "UNCOMPRESSED"), ("zstd", "ZSTD")):
        path = tmp_path / f"{compression}.parquet"
        path.write_bytes(encode_parquet(table, compression, {"rows": 2}))
        metadata = pq.read_metadata(path)
        assert metadata.metadata[b"origin"] == b"test" and metadata.metadata[b"batchrun.rows"] == b"2"
        assert {metadata.row_group(0).column(i).compression for i in range(3)} == {codec}
        assert pq.read_table(path).equals(table)


def test_footer_facts_of_a_committed_part(tmp_path):
    store = LocalStore(tmp_path)
    commit_part(store, 5, part_table(20, 3, errors={2: "bad"}), "zstd", FINGERPRINT)
    footer = pq.read_metadata(tmp_path / part_name(5)).metadata
    assert {key: value for key, value in footer.items() if key.startswith(b"batchrun.")} == {
        b"batchrun.fingerprint": FINGERPRINT.encode(), b"batchrun.part": b"5", b"batchrun.first_row": b"20",
        b"batchrun.rows": b"3", b"batchrun.failed_rows": b"1"}
    assert pq.read_metadata(tmp_path / part_name(5)).row_group(0).column(0).compression == "ZSTD"


def test_facts_of_a_part_of_one_row_and_of_a_full_part(tmp_path):
    store = LocalStore(tmp_path)
    commit_part(store, 1, part_table(4, 1), "none", FINGERPRINT)
    commit_part(store, 2, part_table(8, 4, errors={0: "x"}), "none", FINGERPRINT)
    assert read_part_facts(store, 1, FINGERPRINT, rows_per_part=4) == PartFacts(1, 1, 0)
    assert read_part_facts(store, 2, FINGERPRINT, rows_per_part=4) == PartFacts(2, 4, 1)
    assert read_part_facts(store, 1, FINGERPRINT, rows_per_part=5) is None  # would start at row 5


def test_assemble_part_puts_length_sorted_batches_back_in_row_order_with_failed_rows_null(tmp_path):
    from types import SimpleNamespace

    from pipeline_core.output.parts import assemble_part

    part = SimpleNamespace(
        first_row=10, num_rows=6,
        kept=pa.table({"id": ["a", "b", "c", "d", "e", "f"]}),
        encoded=SimpleNamespace(errors=[None, "input column 'text' is null", None, "too long", None, None]),
    )
    results = [  # batches cover part positions in the order they ran, columns as lists or Arrow arrays
        ([4, 0], {"label": ["L4", "L0"], "score": pa.chunked_array([[0.4], [0.0]], pa.float64())}),
        ([5, 2], {"label": pa.array(["L5", "L2"], pa.large_string()), "score": [0.5, 0.2]}),
    ]
    columns = {"label": pa.string(), "score": pa.float32()}
    table = assemble_part(part, results, columns)
    assert table.schema == pa.schema([("row_id", pa.int64()), ("id", pa.string()), ("label", pa.string()),
                                      ("score", pa.float32()), ("error", pa.string())])
    assert table.to_pydict() == {
        "row_id": [10, 11, 12, 13, 14, 15],
        "id": ["a", "b", "c", "d", "e", "f"],
        "label": ["L0", None, "L2", None, "L4", "L5"],
        "score": [0.0, None, pytest.approx(0.2), None, pytest.approx(0.4), 0.5],
        "error": [None, "input column 'text' is null", None, "too long", None, None],
    }


def test_differences_name_keys_present_on_one_side_only():
    assert differences({"task": "a"}, {"task": "a", "limit": 3}) == ["limit: null -> 3"]
    assert differences({"task": "a", "limit": 3}, {"task": "a"}) == ["limit: 3 -> null"]


def test_fingerprint_of_given_values_never_changes():
    """Runs written by earlier releases must resume: the canonical form and hash may not change."""
    values = {"task": "text-generation", "model.generation": {"max_new_tokens": 4, "do_sample": False},
              "dataset.data_files": Path("rows.jsonl"), "limit": None}
    assert fingerprint(values) == "da0feffc984fcd16"


def test_assembled_part_without_failed_rows_still_has_a_string_error_column():
    """Every part must have the same schema, or readers of the whole directory fail."""
    from types import SimpleNamespace

    from pipeline_core.output.parts import assemble_part

    part = SimpleNamespace(first_row=0, num_rows=2, kept=pa.table({}), encoded=SimpleNamespace(errors=[None, None]))
    table = assemble_part(part, [([1, 0], {"label": ["b", "a"]})], {"label": pa.string()})
    assert table.schema == pa.schema([("row_id", pa.int64()), ("label", pa.string()), ("error", pa.string())])
    assert table.to_pydict() == {"row_id": [0, 1], "label": ["a", "b"], "error": [None, None]}


def test_create_makes_the_file_appear_whole_through_a_hard_link_and_leaves_no_temporary(tmp_path, monkeypatch):
    linked = []
    real_link = os.link

    def watching(source, target):
        linked.append((Path(source).read_bytes(), Path(target).name, Path(target).exists()))
        real_link(source, target)

    monkeypatch.setattr(os, "link", watching)
    store = LocalStore(tmp_path)
    assert store.create(".claim-000001.0", b'{"worker": "w"}') is True
    assert linked == [(b'{"worker": "w"}', ".claim-000001.0", False)]  # complete before the name exists
    assert store.create(".claim-000001.0", b"other") is False
    assert sorted(path.name for path in tmp_path.iterdir()) == [".claim-000001.0"]


def test_create_without_hard_links_falls_back_to_an_exclusive_create(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(os, "link", no_links)
    store = LocalStore(tmp_path)
    assert store.create(".claim-000002.0", b"first") is True
    assert store.create(".claim-000002.0", b"second") is False
    assert (tmp_path / ".claim-000002.0").read_bytes() == b"first"
    assert sorted(path.name for path in tmp_path.iterdir()) == [".claim-000002.0"]
