"""`batching.num_workers: auto`: the choice from measured seconds, and the switch between passes in real runs.

The switch tests force the choice (1 worker, decided after the first part) so that they do not depend on how fast
this machine tokenizes: what they check is that the run that changes its worker count mid-way still computes and
commits every part exactly once, with the output of a run with no workers.
"""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from jobs import edit_job, output, rows, run, write_job
from pipeline_core import execute
from pipeline_core import work as work_module
from pipeline_core.data import workers
from pipeline_core.data.workers import WorkerChoice, choose_workers, usable_cores
from pipeline_core.output.run_dir import CLAIM_PATTERN


@pytest.mark.parametrize("prepare, compute, cores, threads, device, chosen", [
    (0.12, 0.88, 2, 2, "cpu", 0),  # the model on both cores: a worker would halve it for 12% of the time
    (0.45, 0.55, 2, 2, "cpu", 0),  # max(0.45, 2 x 0.55) = 1.1 > 1.0: still none
    (0.6, 0.4, 2, 2, "cpu", 1),  # max(0.6, 0.8) = 0.8 < 0.95
    (0.2, 0.8, 2, 1, "cpu", 1),  # a single-threaded model leaves a core free: max(0.2, 0.8) = 0.8 < 0.95
    (0.03, 0.97, 2, 1, "cpu", 0),  # 0.97 is within 5% of 1.0: not worth a process
    (3.0, 1.0, 8, 8, "cpu", 2),  # 1: max(3, 1.14) = 3; 2: max(1.5, 1.33) = 1.5; 3: max(1, 1.6) = 1.6
    (3.0, 1.0, 16, 1, "cuda", 3),  # the model keeps its speed: enough workers for prepare / k <= compute
    (3.0, 1.0, 4, 4, "cuda", 3),  # its torch threads on every core do not slow an accelerator's model
    (100.0, 1.0, 16, 1, "cuda", 8),  # at most MAX_WORKERS
    (100.0, 1.0, 4, 1, "mps", 3),  # at most one fewer than the cores
    (0.01, 1.0, 16, 1, "cuda", 0),  # nothing worth overlapping
    (5.0, 1.0, 1, 1, "cuda", 0),  # one core: the model's process keeps it
    (0.0, 1.0, 8, 8, "cpu", 0),  # nothing measured
])
def test_choose_workers(prepare, compute, cores, threads, device, chosen):
    assert choose_workers(prepare, compute, cores, threads, device) == chosen


@pytest.mark.parametrize("prepare, cpu, compute, cores, threads, device, chosen", [
    (0.2, 0.2, 0.8, 8, 8, "cpu", 1),  # max(0.2, 0.8 x 8/7 = 0.91) < 0.95
    (0.2, 1.2, 0.8, 8, 8, "cpu", 0),  # prepared on 6 threads: one worker alone takes 1.2 > 1.0
    (0.5, 0.5, 0.3, 16, 1, "cuda", 2),  # 2: max(0.25, 0.3) = 0.3; 3 workers are not 5% faster
    (0.5, 2.0, 0.3, 16, 1, "cuda", 7),  # 2.0 / 7 = 0.29 < 0.3: the workers need 7 to keep up
    (0.5, 0.1, 0.3, 16, 1, "cuda", 2),  # waiting on reads is no less in a worker: the wall time bounds it
])
def test_a_worker_prepares_in_the_cpu_time_the_main_process_spent(prepare, cpu, compute, cores, threads, device,
                                                                  chosen):
    assert choose_workers(prepare, compute, cores, threads, device, prepare_cpu_seconds=cpu) == chosen


def test_usable_cores_are_shared_by_the_processes_launched_here(monkeypatch):
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    assert [usable_cores(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


def test_a_choice_measures_until_enough_then_describes_itself():
    choice = WorkerChoice()
    choice.measure(0.5, 1.0, 100)
    assert not choice.enough()
    choice.measure(0.1, 0.4, 28)
    assert choice.enough() and choice.decide(cores=2, model_threads=2, device_type="cpu") == 0
    assert choice.prepare_cpu_seconds == pytest.approx(0.6)  # none measured: the wall time stands for it
    choice.measure(0.0, 0.0, 0, 3.0)
    assert choice.prepare_cpu_seconds == pytest.approx(3.6)

    threaded = WorkerChoice()
    threaded.measure(0.4, 1.6, 100, 2.4)  # prepared on several threads: 6x its wall time in CPU time
    assert threaded.decide(cores=8, model_threads=8, device_type="cpu") == 0  # by wall time alone it would be 1
    assert choice.describe(2) == "num_workers auto: 0 (preparing rows took 30% of the time with none, 128 rows " \
                                 "measured, 2 cores)"


@pytest.fixture
def loaders(monkeypatch) -> list[dict]:
    """Each loader a run makes: its worker count, the parts it skips as committed, the claims OUTPUT holds then."""
    made: list[dict] = []
    part_loader = work_module.part_loader

    def spy(parts, num_workers, pin_memory):
        claims = sorted(name for name in parts.claims.store.names() if CLAIM_PATTERN.fullmatch(name))
        made.append({"workers": num_workers, "skip": sorted(parts.skip), "claims": claims})
        return part_loader(parts, num_workers, pin_memory)

    monkeypatch.setattr(work_module, "part_loader", spy)
    return made


@pytest.fixture
def forced(monkeypatch) -> list[int]:
    """auto decides after the first part and chooses 1 worker; the part indexes computed, one per slice."""
    monkeypatch.setattr(workers, "MEASURE_SECONDS", 0.0)
    monkeypatch.setattr(workers, "choose_workers", lambda *args: 1)
    computed: list[int] = []
    part_runner = execute.PartRunner.run

    def counting(self, part):
        computed.append(part.index)
        return part_runner(self, part)

    monkeypatch.setattr(execute.PartRunner, "run", counting)
    return computed


def as_parquet(job, converted: bool = False):
    data = job.parent / "rows.parquet"
    pd.read_json(job.parent / "rows.jsonl", lines=True).to_parquet(data)
    return edit_job(job, dataset={"path": "parquet", "data_files": data, **({"streaming": False} if converted else {})})


SOURCES = {
    "json-stream": lambda job: job,  # read in order, total unknown until read through
    "parquet": as_parquet,  # the row-group reader: random access
    "converted": lambda job: as_parquet(job, converted=True),  # dataset.streaming: false
}


@pytest.mark.parametrize("source", SOURCES)
def test_auto_switches_to_workers_after_the_first_part_computing_every_part_once(tmp_path, tiny_models, source,
                                                                                  forced, loaders, caplog):
    data = rows(22)
    reference = SOURCES[source](write_job(tmp_path / "none", tiny_models.text_classifier, data, workers=0))
    assert run(reference) == 0
    forced.clear(), loaders.clear()
    job = SOURCES[source](write_job(tmp_path / "auto", tiny_models.text_classifier, data))
    edit_job(job, batching={"num_workers": "auto"})
    with caplog.at_level(logging.INFO, logger="batchrun"):
        assert run(job) == 0
    # the first pass measured part 0 with no workers and claimed nothing past it; the second took the rest. A
    # stream of unknown length computes one more part with none first: its end, if it came, would name the length
    measured = [0, 1] if source == "json-stream" else [0]
    assert loaders == [{"workers": 0, "skip": [], "claims": []}, {"workers": 1, "skip": measured, "claims": []}]
    assert sorted(forced) == [0, 1, 2, 3, 4, 5] and forced[:len(measured)] == measured
    assert sum("num_workers auto: 1" in message for message in caplog.messages) == 1
    got = output(job)
    assert got["row_id"].tolist() == list(range(22))
    pd.testing.assert_frame_equal(got, output(reference))


def test_a_share_of_one_part_never_switches(tmp_path, tiny_models, forced, loaders):
    job = write_job(tmp_path, tiny_models.text_classifier, rows(10), rows_per_part=64)
    edit_job(job, batching={"num_workers": "auto"})
    assert run(job) == 0
    assert [made["workers"] for made in loaders] == [0] and forced == [0]


@pytest.mark.parametrize("setting, expected", [("0", [0]), ("2", [2])])
def test_a_number_of_workers_is_kept_for_the_whole_run(tmp_path, tiny_models, forced, loaders, setting, expected):
    job = write_job(tmp_path, tiny_models.text_classifier, rows(12))
    assert run(job, "--set", f"batching.num_workers={setting}") == 0
    assert [made["workers"] for made in loaders] == expected and sorted(forced) == [0, 1, 2]


def test_a_resume_with_auto_computes_exactly_the_missing_parts(tmp_path, tiny_models, forced, loaders):
    job = as_parquet(write_job(tmp_path, tiny_models.text_classifier, rows(20)))
    assert run(job) == 0
    expected = output(job)
    out = tmp_path / "out"
    (out / "_SUCCESS").unlink()
    for index in (1, 3, 4):
        (out / f"part-00000{index}.parquet").unlink()
    forced.clear(), loaders.clear()
    assert run(job, "--set", "batching.num_workers=auto") == 0
    assert forced == [1, 3, 4] and [made["workers"] for made in loaders] == [0, 1]
    assert loaders[1]["skip"] == [0, 1, 2]
    pd.testing.assert_frame_equal(output(job), expected)


def test_auto_without_forcing_gives_the_output_of_no_workers(tmp_path, tiny_models, monkeypatch):
    """Whatever this machine's measurement chooses, the output is the same."""
    monkeypatch.setattr(workers, "MEASURE_SECONDS", 0.0)
    job = write_job(tmp_path, tiny_models.text_classifier, rows(18))
    assert run(job) == 0
    alone = output(job)
    assert run(job, "--fresh", "--set", "batching.num_workers=auto") == 0
    pd.testing.assert_frame_equal(output(job), alone)
