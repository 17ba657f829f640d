"""The model's and the input's provenance in the run's identity: a model or input changed in place under a run is
refused on resume (exit 2) naming what changed; a hub model's commit comes from the cache, offline; weights are
known by their size, safetensors header and sampled blocks, never hashed whole, so a copy keeps its identity; runs
recorded before provenance resume as they were.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from jobs import rows, run, write_job
from pipeline_core.identity import keys as provenance  # its changed_files compares two provenances
from pipeline_core.identity.job import job_identity
from pipeline_core.identity.keys import differences, fingerprint, provenance_changes
from pipeline_core.identity.provenance import (
    file_summary,
    input_provenance,
    local_files,
    model_provenance,
    safetensors_header,
    sampled_digest,
)
from pipeline_core.manifest import load_job

SHA_A, SHA_B = "a" * 40, "b" * 40


@pytest.fixture
def model(tmp_path, tiny_models) -> Path:
    """A copy of the tiny classifier that a test may change in place."""
    return Path(shutil.copytree(tiny_models.text_classifier, tmp_path / "model"))


@pytest.fixture
def finished(tmp_path, model, capsys) -> Path:
    job = write_job(tmp_path / "run", model, rows(6))
    assert run(job) == 0
    capsys.readouterr()
    return job


def refusal(job: Path, capsys) -> str:
    """The message of a rerun that must exit 2."""
    assert run(job) == 2
    return capsys.readouterr().err


def test_run_info_records_the_models_digest_and_the_inputs_files(finished, model):
    info = json.loads((finished.parent / "out" / "_batchrun.json").read_text())
    resolved = info["identity"]["model.resolved"]
    assert resolved["kind"] == "local" and len(resolved["digest"]) == 16
    weights = (model / "model.safetensors").stat()
    assert resolved["files"]["model.safetensors"] == {
        "size": weights.st_size, "samples": sampled_digest(str(model / "model.safetensors"), weights.st_size),
        "header": safetensors_header(str(model / "model.safetensors"))}
    assert set(resolved["files"]["config.json"]) == {"sha256"}
    data = finished.parent / "rows.jsonl"
    assert info["identity"]["input.resolved"] == {
        "kind": "files", "files": {str(data): {"size": data.stat().st_size, "mtime_ns": data.stat().st_mtime_ns}}}


def test_an_unchanged_rerun_of_a_finished_run_has_nothing_to_do(finished, caplog):
    caplog.set_level("INFO", logger="batchrun")
    assert run(finished) == 0
    assert "already holds this finished run; nothing to do" in caplog.text


def test_a_config_rewritten_in_place_exits_2_naming_it(finished, model, capsys):
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "id2label": {"0": "NO", "1": "YES"}}))
    err = refusal(finished, capsys)
    assert "  - model files changed: config.json (content)\n" in err
    assert "model.resolved" not in err and "Traceback" not in err  # named, not two dicts dumped


def test_weights_rewritten_in_place_exit_2_naming_the_file(finished, model, capsys):
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0")  # another size, so other blocks sampled; same header
    assert "  - model files changed: model.safetensors (size, content)\n" in refusal(finished, capsys)


def test_weights_retrained_in_place_with_the_same_size_and_time_are_named(finished, model, capsys):
    weights = model / "model.safetensors"
    stat, data = weights.stat(), bytearray(weights.read_bytes())
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    data[header_end:] = bytes(byte ^ 0x55 for byte in data[header_end:])  # every weight changed
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert "  - model files changed: model.safetensors (content)\n" in refusal(finished, capsys)


def test_a_copy_of_the_model_keeps_its_identity(finished, model, tmp_path):
    """A node-local copy of a shared model (new modification times) is the same model for every rank."""
    copy = Path(shutil.copytree(model, tmp_path / "copy", copy_function=shutil.copyfile))
    assert (copy / "model.safetensors").stat().st_mtime_ns != (model / "model.safetensors").stat().st_mtime_ns
    job = load_job(finished, [])
    moved = load_job(finished, [f"model.name={copy}"])
    assert model_provenance(moved)["digest"] == model_provenance(job)["digest"]
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")  # an edit does change it
    assert model_provenance(moved)["digest"] != model_provenance(job)["digest"]


def test_weights_with_other_tensors_are_named_by_their_header_too(tmp_path):
    weights = tmp_path / "model.safetensors"
    write_safetensors(weights, {"a": [2, 2]})
    before = file_summary(str(weights))
    stat = weights.stat()
    write_safetensors(weights, {"b": [2, 2]})  # the same size: only the header tells
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = file_summary(str(weights))
    assert provenance.changed_files({"model.safetensors": before}, {"model.safetensors": after}) == [
        "model.safetensors (content, tensors)"]


def test_a_file_added_to_or_removed_from_the_model_is_named(finished, model, capsys):
    (model / "special_tokens_map.json").write_text("{}")
    assert "  - model files changed: special_tokens_map.json (new)\n" in refusal(finished, capsys)
    (model / "special_tokens_map.json").unlink()
    (model / "tokenizer_config.json").unlink()
    assert "  - model files changed: tokenizer_config.json (gone)\n" in refusal(finished, capsys)


def test_documentation_and_hidden_files_of_the_model_are_left_out(finished, model, caplog):
    (model / "README.md").write_text("# a model card edited mid-run")
    (model / ".cache").mkdir()
    (model / ".cache" / "state.json").write_text("{}")
    (model / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    caplog.set_level("INFO", logger="batchrun")
    assert run(finished) == 0
    assert "nothing to do" in caplog.text


def test_weights_are_read_only_in_sampled_blocks(tmp_path, monkeypatch):
    """The cost and its limit: of a weights file only the safetensors header and 64 blocks of 4 KiB are read, so a
    rewrite is noticed wherever it touches a block, and an edit confined to the bytes between blocks is not."""
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    write_safetensors(directory / "model.safetensors", {"w": [512, 512]}, fill=1)  # 1 MiB of weights
    (directory / "pytorch_model.bin").write_bytes(b"x" * 2_000_000)
    job = load_job(write_job(tmp_path, directory, rows(1)), [])
    before = model_provenance(job)
    read = []
    real_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if str(path).endswith((".safetensors", ".bin")):
            real_read = handle.read
            handle = Reading(handle, lambda size=-1: read.append(size) or real_read(size))
        return handle

    monkeypatch.setattr("builtins.open", counting_open)
    assert model_provenance(job) == before
    header_length = struct.unpack("<Q", (directory / "model.safetensors").read_bytes()[:8])[0]
    # of the safetensors file 64 blocks, then the header's length and the header; of the .bin 64 blocks
    assert read == [4096] * 64 + [8, header_length] + [4096] * 64

    bin_file = directory / "pytorch_model.bin"
    stat = bin_file.stat()
    between = bytearray(bin_file.read_bytes())
    between[4096 + 100] = ord("y")  # after the first block, before the second (31,684 bytes on)
    bin_file.write_bytes(bytes(between))
    os.utime(bin_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert model_provenance(job) == before  # the limit
    bin_file.write_bytes(b"y" * 2_000_000)  # rewritten: every block differs
    assert provenance.changed_files(before["files"], model_provenance(job)["files"]) == [
        "pytorch_model.bin (content)"]
    rewritten = model_provenance(job)["files"]["pytorch_model.bin"]
    tail = bytearray(bin_file.read_bytes())
    tail[-1] = ord("z")  # the last block ends at the file's last byte
    bin_file.write_bytes(bytes(tail))
    assert model_provenance(job)["files"]["pytorch_model.bin"] != rewritten


class Reading:
    """A file handle whose reads are counted."""

    def __init__(self, handle, read):
        self._handle, self.read = handle, read

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()

    def __getattr__(self, name):
        return getattr(self._handle, name)


def write_safetensors(path: Path, shapes: dict, fill: int = 0) -> None:
    """A float32 safetensors file of the given tensor shapes, each tensor filled with bytes `fill`."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes([fill]) * offset)


def test_a_data_file_appended_to_in_place_exits_2_naming_it(finished, capsys):
    data = finished.parent / "rows.jsonl"
    with data.open("a") as handle:
        handle.write(json.dumps({"id": "late", "text": "a row that came late"}) + "\n")
    assert f"  - input files changed: {data} (size, modified)\n" in refusal(finished, capsys)


def test_an_unfinished_run_changed_in_place_is_refused_before_the_model_loads(tmp_path, model, capsys, monkeypatch):
    job = write_job(tmp_path / "run", model, rows(8))
    assert run(job) == 0
    out = tmp_path / "run" / "out"
    (out / "_SUCCESS").unlink()
    (out / "part-000001.parquet").unlink()
    (model / "config.json").write_text((model / "config.json").read_text() + "\n")
    monkeypatch.setattr("pipeline_core.engines.in_process.initialize",
                        lambda *args: pytest.fail("the model was loaded"))
    assert "model files changed: config.json (content)" in refusal(job, capsys)


def legacy_run_info(out: Path) -> dict:
    """_batchrun.json as a batchrun from before provenance wrote it: the same run, without the two keys."""
    info = json.loads((out / "_batchrun.json").read_text())
    for key in ("model.resolved", "input.resolved"):
        del info["identity"][key]
    info["fingerprint"] = fingerprint(info["identity"])
    (out / "_batchrun.json").write_text(json.dumps(info, indent=2))
    return info


def test_a_finished_run_recorded_before_provenance_has_nothing_to_do(finished, caplog):
    legacy_run_info(finished.parent / "out")
    caplog.set_level("INFO", logger="batchrun")
    assert run(finished) == 0
    assert "nothing to do" in caplog.text


def test_a_run_recorded_before_provenance_resumes_keeping_its_parts_and_its_identity(tmp_path, model, caplog):
    job = write_job(tmp_path / "run", model, rows(12))
    assert run(job) == 0
    out = tmp_path / "run" / "out"
    # the parts of an older batchrun carry the fingerprint of its identity, which had no provenance
    info = legacy_run_info(out)
    rewrite_footers(out, info["fingerprint"])
    (out / "_SUCCESS").unlink()
    (out / "part-000002.parquet").unlink()
    kept = {name: (out / name).stat().st_mtime_ns for name in ("part-000000.parquet", "part-000001.parquet")}
    caplog.set_level("INFO", logger="batchrun")
    assert run(job) == 0
    assert "2 parts already committed" in caplog.text
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # not recomputed
    after = json.loads((out / "_batchrun.json").read_text())
    assert (after["fingerprint"], after["identity"]) == (info["fingerprint"], info["identity"])


def rewrite_footers(out: Path, run_fingerprint: str) -> None:
    import pyarrow.parquet as pq

    for path in sorted(out.glob("part-*.parquet")):
        table = pq.read_table(path)
        metadata = {**(table.schema.metadata or {}), b"batchrun.fingerprint": run_fingerprint.encode()}
        pq.write_table(table.replace_schema_metadata(metadata), path)


def fake_hub_cache(root: Path, repo_folder: str, refs: dict[str, str]) -> Path:
    """The Hugging Face cache's layout: refs/<revision> holding a commit, snapshots/<commit>/ its files."""
    for revision, commit in refs.items():
        (root / repo_folder / "refs" / revision).parent.mkdir(parents=True, exist_ok=True)
        (root / repo_folder / "refs" / revision).write_text(commit)
        (root / repo_folder / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        (root / repo_folder / "snapshots" / commit / "config.json").write_text("{}")
    return root


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_models_commit_comes_from_the_cache_offline(tmp_path, hub_cache):
    fake_hub_cache(hub_cache, "models--org--name", {"main": SHA_A, "v2": SHA_B})
    job = load_job(write_job(tmp_path, "org/name", rows(1)), [])
    assert model_provenance(job) == {"kind": "hub", "commit": SHA_A}
    assert model_provenance(load_job(tmp_path / "job.yaml", ["model.revision=v2"]))["commit"] == SHA_B
    pinned = "c" * 40  # a revision that is a commit is its own answer, cached or not
    assert model_provenance(load_job(tmp_path / "job.yaml", [f"model.revision={pinned}"]))["commit"] == pinned
    assert model_provenance(load_job(tmp_path / "job.yaml", ["model.name=org/never-downloaded"]))["commit"] is None


def test_a_hub_models_new_commit_is_named_and_an_unknown_one_is_not_compared(tmp_path, hub_cache):
    fake_hub_cache(hub_cache, "models--org--name", {"main": SHA_A})
    job = load_job(write_job(tmp_path, "org/name", rows(1)), [])
    before = job_identity(job, None)[0]
    fake_hub_cache(hub_cache, "models--org--name", {"main": SHA_B})
    assert differences(before, job_identity(job, None)[0]) == [f"model commit {SHA_A} -> {SHA_B}"]
    shutil.rmtree(hub_cache / "models--org--name")  # the cache cannot tell: no reason to refuse a resume
    assert differences(before, job_identity(job, None)[0]) == []


def test_a_provenance_of_another_kind_is_named_by_both_kinds():
    files = {"kind": "files", "files": {"/data/day.jsonl": {"size": 14, "mtime_ns": 1}}}
    assert provenance_changes("input", files, {"kind": "saved", "fingerprint": "f00d"}) == ["input: files -> saved"]
    local = {"kind": "local", "digest": "d", "files": {}}
    assert provenance_changes("model", {"kind": "hub", "commit": SHA_A}, local) == ["model: hub -> local"]


def test_every_changed_file_is_named_in_one_change():
    old = {"kind": "local", "files": {"config.json": {"sha256": "a"}, "tokenizer.json": {"sha256": "t"},
                                      "vocab.txt": {"sha256": "b"}}}
    grown = {"size": 2**27, "samples": "s"}  # a file now over SMALL_FILE: known by size and samples
    new = {"kind": "local", "files": {"config.json": {"sha256": "c"}, "tokenizer.json": grown}}
    assert provenance_changes("model", old, new) == [
        "model files changed: config.json (content), tokenizer.json (content), vocab.txt (gone)"]


def test_a_hub_datasets_commit_comes_from_the_cache(tmp_path, hub_cache):
    fake_hub_cache(hub_cache, "datasets--org--rows", {"main": SHA_A})
    job = load_job(write_job(tmp_path, "model", rows(1)), ["dataset.path=org/rows", "dataset.data_files=null"])
    assert input_provenance(job, "train") == {"kind": "hub", "commit": SHA_A}
    fake_hub_cache(hub_cache, "datasets--org--rows", {"v1": SHA_B})
    assert input_provenance(load_job(tmp_path / "job.yaml", ["dataset.path=org/rows", "dataset.data_files=null",
                                                            "dataset.revision=v1"]), "train")["commit"] == SHA_B


def test_a_saved_datasets_fingerprint_is_its_identity(tmp_path):
    saved = tmp_path / "saved"
    for split, value in (("train", "f00d"), ("test", "beef")):  # a DatasetDict's layout
        (saved / split).mkdir(parents=True)
        (saved / split / "state.json").write_text(json.dumps({"_fingerprint": value}))
    (saved / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    job = load_job(write_job(tmp_path, "model", rows(1)), [f"dataset.path={saved}", "dataset.data_files=null"])
    assert input_provenance(job, "train") == {"kind": "saved", "fingerprint": "f00d"}
    assert input_provenance(job, "test") == {"kind": "saved", "fingerprint": "beef"}
    assert provenance_changes("input", {"kind": "saved", "fingerprint": "f00d"},
                              {"kind": "saved", "fingerprint": "cafe"}) == ["input fingerprint f00d -> cafe"]


def test_a_saved_dataset_without_splits_is_known_by_its_own_fingerprint_for_any_split(tmp_path):
    saved = tmp_path / "saved"  # a Dataset's layout: state.json at the top, no folder per split
    saved.mkdir()
    (saved / "state.json").write_text(json.dumps({"_fingerprint": "f00d"}))
    (saved / "data-00000-of-00001.arrow").write_bytes(b"arrow")
    job = load_job(write_job(tmp_path, "model", rows(1)), [f"dataset.path={saved}", "dataset.data_files=null"])
    assert input_provenance(job, "train") == {"kind": "saved", "fingerprint": "f00d"}


def test_an_image_jobs_folder_is_known_by_its_images_and_a_text_jobs_without_them(tmp_path):
    folder = tmp_path / "folder"
    (folder / "cat").mkdir(parents=True)
    for name in ("cat/a.png", "cat/b.jpg", "README.md", "metadata.jsonl"):
        (folder / name).write_bytes(b"x")
    job = write_job(tmp_path, "model", rows(1))
    image = load_job(job, ["task=image-classification", f"dataset.path={folder}", "dataset.data_files=null",
                           "dataset.input_column=null", "dataset.image_column=image"])
    text = load_job(job, [f"dataset.path={folder}", "dataset.data_files=null"])
    listed = {kind: sorted(Path(name).relative_to(folder).as_posix()
                           for name in input_provenance(loaded, "train")["files"])
              for kind, loaded in (("image", image), ("text", text))}
    assert listed == {"image": ["cat/a.png", "cat/b.jpg", "metadata.jsonl"], "text": ["metadata.jsonl"]}


def test_a_safetensors_file_that_is_not_one_has_no_header_digest(tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(struct.pack("<Q", 100) + b'{"w": 1}')  # a header of 100 bytes announced, 8 there
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(b"\xff" * 8 + b"{}")  # a length no file holds: nothing is read
    assert (safetensors_header(str(truncated)), safetensors_header(str(huge))) == (None, None)


def test_a_data_file_gone_since_it_was_listed_leaves_the_others_known(tmp_path):
    (tmp_path / "b.jsonl").write_text("{}\n")
    found = local_files([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")])
    assert list(found) == [str(tmp_path / "b.jsonl")]


def test_a_data_file_inside_an_archive_is_left_to_datasets(tmp_path):
    job = load_job(write_job(tmp_path, "model", rows(1)), [f"dataset.data_files=zip://rows.jsonl::{tmp_path}/a.zip"])
    assert input_provenance(job, "train") is None  # zip:// names a file inside an archive, not a remote one


def test_arrow_files_are_known_by_size_and_time(tmp_path):
    arrow = tmp_path / "arrows"
    arrow.mkdir()
    (arrow / "data-00000-of-00001.arrow").write_bytes(b"arrow")
    job = load_job(write_job(tmp_path, "model", rows(1)), [f"dataset.path={arrow}", "dataset.data_files=null"])
    stat = (arrow / "data-00000-of-00001.arrow").stat()
    expected = {"size": 5, "mtime_ns": stat.st_mtime_ns}
    assert input_provenance(job, "train") == {"kind": "files",
                                              "files": {str(arrow / "data-00000-of-00001.arrow"): expected}}
    file_job = load_job(tmp_path / "job.yaml", [f"dataset.path={arrow / 'data-00000-of-00001.arrow'}",
                                                "dataset.data_files=null"])
    assert input_provenance(file_job, "train")["files"] == {str(arrow / "data-00000-of-00001.arrow"): expected}


def test_remote_files_are_known_by_what_fsspec_reports_and_a_failed_lookup_is_unknown(tmp_path):
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.pipe("/provenance-test/day.jsonl", b'{"text": "a"}\n')
    job = load_job(write_job(tmp_path, "model", rows(1)), ["dataset.data_files=memory://provenance-test/*.jsonl"])
    found = input_provenance(job, "train")
    assert found["kind"] == "remote"
    assert [(name, summary["size"]) for name, summary in found["files"].items()] == [
        ("memory:///provenance-test/day.jsonl", 14)]
    plain = load_job(tmp_path / "job.yaml", ["dataset.data_files=memory://provenance-test/day.jsonl"])  # no wildcard
    assert input_provenance(plain, "train") == found
    broken = load_job(tmp_path / "job.yaml", ["dataset.data_files=nosuchprotocol://bucket/day.jsonl"])
    assert input_provenance(broken, "train") == {"kind": "remote", "files": None}
    assert provenance_changes("input", found, {"kind": "remote", "files": None}) == []
