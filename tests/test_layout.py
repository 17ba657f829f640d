"""Layouts: the launcher's variables and the shard options, `auto` from a Kubernetes indexed Job or a Slurm array,
their messages; each shard's block of parts and each rank's starting point; model.device_map refused with several
processes on one node, before any model loads."""

from __future__ import annotations

import pytest

from jobs import rows, write_job
from pipeline_core.cli import run_cli
from pipeline_core.errors import UsageError
from pipeline_core.layout import Layout, Share, check_device_map, layout_from
from pipeline_core.output import run_dir as run_dir_module


def test_without_a_launcher_or_shards_a_process_is_rank_0_of_1_shard_0_of_1():
    layout = layout_from(None, None, env={})
    assert layout == Layout(rank=0, world_size=1, local_rank=None, local_world_size=1, shard_index=0, num_shards=1)
    assert not layout.launched and layout.shows_progress
    assert layout.tag() == "" and layout.describe() == "one process"


def test_the_launchers_variables_give_rank_world_and_local_rank():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    layout = layout_from(None, None, env=env)
    assert (layout.rank, layout.world_size, layout.local_rank, layout.local_world_size) == (3, 4, 1, 2)
    assert layout.launched and not layout.shows_progress
    assert layout.tag() == "rank 3/4" and layout.describe() == "rank 3 of 4 (local rank 1)"


def test_a_local_rank_is_set_only_under_a_launcher_of_several_processes():
    """LOCAL_RANK left in the environment of a single process (or a launcher of one) labels nothing; a launcher that
    sets WORLD_SIZE without LOCAL_RANK leaves it unset rather than failing."""
    alone = layout_from(None, None, env={"LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    assert alone.local_rank is None and alone.labels()["local_rank"] is None
    assert layout_from(None, None, env={"LOCAL_RANK": "0"}).local_rank is None
    without = layout_from(None, None, env={"RANK": "1", "WORLD_SIZE": "2"})
    assert (without.rank, without.world_size, without.local_rank) == (1, 2, None)


def test_two_shards_are_named_in_the_tag_and_the_description():
    layout = layout_from("2", "1", env={})
    assert (layout.shard_index, layout.num_shards) == (1, 2)
    assert layout.tag() == "shard 1/2" and layout.describe() == "shard 1 of 2"


def test_shards_and_ranks_compose():
    layout = layout_from("6", "2", env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert (layout.shard_index, layout.num_shards, layout.rank) == (2, 6, 0)
    assert layout.tag() == "shard 2/6 rank 0/2"
    assert layout.describe() == "rank 0 of 2 (local rank 0), shard 2 of 6"
    assert layout.labels() == {"rank": 0, "world_size": 2, "local_rank": 0, "shard_index": 2, "num_shards": 6,
                               "launch": ":/", "attempt": 0}


def test_ranks_of_one_launch_share_its_rendezvous_and_restart_count_and_a_single_process_has_none():
    """torchrun gives every rank of a launch, on every node, the same rendezvous and run id; output/lock.py lets a
    launch's own ranks (of any restart) through, and a rank waits for the rank 0 of its own restart."""
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "node-0", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "job-7",
           "TORCHELASTIC_RESTART_COUNT": "1"}
    layouts = [layout_from(None, None, env={**env, "RANK": rank}) for rank in ("0", "1")]
    assert [(layout.launch, layout.attempt) for layout in layouts] == [("node-0:29500/job-7", 1)] * 2
    assert layouts[1].labels()["launch"] == "node-0:29500/job-7" and layouts[1].labels()["attempt"] == 1
    alone = layout_from("2", "1", env={"MASTER_ADDR": "node-0", "MASTER_PORT": "29500"})
    assert alone.launch is None and "launch" not in alone.labels() and "attempt" not in alone.labels()


@pytest.mark.parametrize("env, index", [({"JOB_COMPLETION_INDEX": "3"}, 3),
                                        ({"SLURM_ARRAY_TASK_ID": "3"}, 3),
                                        ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1"}, 3),
                                        ({"JOB_COMPLETION_INDEX": "0", "SLURM_ARRAY_TASK_ID": "2"}, 0)])
def test_shard_index_auto_reads_the_schedulers_variable(env, index):
    assert layout_from("4", "auto", env=env).shard_index == index


def test_num_shards_auto_reads_the_slurm_array_size():
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "3"}
    layout = layout_from("auto", "auto", env=env)
    assert (layout.shard_index, layout.num_shards) == (0, 3)
    one_task = layout_from("auto", "auto", env={"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "1"})
    assert (one_task.shard_index, one_task.num_shards) == (0, 1)  # an array of one task is one shard, not an error


TOGETHER = ("--num-shards and --shard-index go together: --num-shards 4 --shard-index 0 (or --shard-index auto under a "
            "Kubernetes indexed Job or a Slurm array)")


@pytest.mark.parametrize("shards, index, env, message", [
    ("4", None, {}, TOGETHER),
    (None, "0", {}, TOGETHER),
    ("4", "4", {}, "--shard-index must be below --num-shards (4), got 4"),
    ("0", "0", {}, "--num-shards must be an integer of at least 1, got '0'"),
    ("four", "0", {}, "--num-shards must be an integer of at least 1, got 'four'"),
    ("4", "-1", {}, "--shard-index must be an integer of at least 0, got '-1'"),
    ("4", "auto", {}, "--shard-index auto reads JOB_COMPLETION_INDEX (a Kubernetes indexed Job) or "
                      "SLURM_ARRAY_TASK_ID (a Slurm job array); neither is set: give the index, --shard-index 0"),
    ("auto", "0", {}, "--num-shards auto reads SLURM_ARRAY_TASK_COUNT (a Slurm job array), which is not set; "
                      "give the number of shards: --num-shards 4"),
    ("auto", "auto", {"SLURM_ARRAY_TASK_COUNT": "0", "SLURM_ARRAY_TASK_ID": "0"},
     "SLURM_ARRAY_TASK_COUNT must be an integer of at least 1, got '0'"),
    ("4", "auto", {"JOB_COMPLETION_INDEX": "x"}, "JOB_COMPLETION_INDEX must be an integer of at least 0, got 'x'"),
    ("4", "auto", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "first"},
     "SLURM_ARRAY_TASK_MIN must be an integer of at least 0, got 'first'"),
    ("4", "auto", {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1"},
     "--shard-index must be below --num-shards (4), got 6"),
])
def test_bad_shard_options_name_the_option_and_the_value(shards, index, env, message):
    with pytest.raises(UsageError) as raised:
        layout_from(shards, index, env=env)
    assert str(raised.value) == message


@pytest.mark.parametrize("parts, shards, blocks", [
    (12, 6, [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]),
    (10, 3, [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]),
    (2, 3, [[], [0], [1]]),
    (0, 2, [[], []]),
])
def test_shards_of_a_known_total_are_contiguous_blocks_covering_every_part_once(parts, shards, blocks):
    found = [list(Share(Layout(shard_index=index, num_shards=shards), parts).parts()) for index in range(shards)]
    assert found == blocks
    share = Share(Layout(shard_index=1, num_shards=shards), parts)
    assert [index for index in range(parts) if share.includes(index)] == blocks[1]


def test_a_stream_of_unknown_length_is_dealt_round_robin_and_stays_so_once_its_length_is_known():
    share = Share(Layout(shard_index=1, num_shards=3), None)
    assert share.round_robin and share.last() is None
    assert [index for index in range(10) if share.includes(index)] == [1, 4, 7]
    share.total_parts = 10  # learned at the stream's end: no part may move to another shard
    assert list(share.parts()) == [1, 4, 7] and share.includes(4) and not share.includes(2)


def test_a_sequential_read_of_a_shard_can_stop_after_its_last_part():
    assert Share(Layout(shard_index=1, num_shards=3), 10).last() == 5
    assert Share(Layout(shard_index=0, num_shards=3), 2).last() == -1  # an empty block: nothing to read
    assert Share(Layout(), 10).last() is None  # one shard: read to the end, where the part count is learned


def test_each_rank_starts_at_its_own_slice_of_the_block_then_wraps_around():
    orders = [Share(Layout(rank=rank, world_size=3, shard_index=1, num_shards=2), 12).order() for rank in range(3)]
    assert orders == [[6, 7, 8, 9, 10, 11], [8, 9, 10, 11, 6, 7], [10, 11, 6, 7, 8, 9]]


def test_a_device_map_is_refused_with_several_processes_on_a_node():
    check_device_map("auto", Layout(world_size=2, local_world_size=1))  # one process per node: fine
    check_device_map(None, Layout(world_size=8, local_world_size=8))
    with pytest.raises(UsageError) as raised:
        check_device_map("auto", Layout(world_size=8, local_world_size=8))
    assert str(raised.value) == (
        "model.device_map='auto' spreads one model over this node's devices, but the launcher started 8 processes on "
        "this node; start one process per node (torchrun --nproc-per-node 1, accelerate launch --num_processes = "
        "number of machines) or remove model.device_map to run one model per device")
    with pytest.raises(UsageError, match=r"model.device_map=\{'': 0\} spreads .* started 2 processes on this node"):
        check_device_map({"": 0}, Layout(world_size=2, local_world_size=2))


def test_the_refusal_comes_before_any_model_loads(tmp_path, capsys, monkeypatch):
    from pipeline_core.engines import in_process

    monkeypatch.setattr(in_process, "initialize", lambda job, *more: pytest.fail("the model was loaded"))
    job = write_job(tmp_path, tmp_path / "no-model-here", rows(4), model={"device_map": "auto"})
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    assert run_cli(["run", str(job), "--no-progress"]) == 2
    assert "start one process per node" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fresh_is_refused_for_a_shard(tmp_path, capsys):
    job = write_job(tmp_path, tmp_path / "no-model-here", rows(4))
    assert run_cli(["run", str(job), "--no-progress", "--fresh", "--num-shards", "2", "--shard-index", "0"]) == 2
    assert "--fresh with --num-shards would discard the other shards' parts" in capsys.readouterr().err


# --- ranks other than 0 wait for rank 0 to prepare OUTPUT ---------------------------------------------------


def rank_0_record(out, state="running") -> None:
    import json
    import time

    out.mkdir(exist_ok=True)
    # another host's process: its heartbeat says it is alive (a record with this process's pid that is not one of
    # its own is an earlier process's, before a restart in a fresh PID namespace)
    record = {"worker": "rank0", "host": "rank-0-node", "pid": 4242, "state": state, "rank": 0,
              "started": time.time(), "heartbeat": time.time()}
    (out / ".worker-rank0.json").write_text(json.dumps(record))


def test_a_rank_waits_for_rank_0s_live_record_then_checks_the_identity(tmp_path):
    import threading

    from pipeline_core.execute import StopFlag
    from pipeline_core.output.run_dir import RunDir
    from pipeline_core.output.store import LocalStore

    store, identity = LocalStore(tmp_path / "out"), {"task": "text-classification"}
    timer = threading.Timer(0.5, lambda: (RunDir(store).prepare(identity, False, Layout()),
                                          rank_0_record(tmp_path / "out")))
    timer.start()
    assert RunDir(store).join(identity, StopFlag()) == (False, identity)  # prepared, not finished
    assert (tmp_path / "out" / ".worker-rank0.json").exists()
    with pytest.raises(UsageError, match="holds a run of a different job"):
        RunDir(store).join({"task": "summarization"}, StopFlag())
    (tmp_path / "out" / ".worker-rank0.json").unlink()  # rank 0 found the job finished: it wrote no record
    (tmp_path / "out" / "_SUCCESS").touch()
    assert RunDir(store).join(identity, StopFlag()) == (True, identity)


def test_a_rank_waits_no_longer_than_the_timeout_and_stops_on_a_signal(tmp_path, monkeypatch):
    from pipeline_core.errors import BatchrunError
    from pipeline_core.execute import StopFlag
    from pipeline_core.output.run_dir import RunDir
    from pipeline_core.output.store import LocalStore

    store = LocalStore(tmp_path / "out")
    rank_0_record(tmp_path / "out", state="stopped")  # an earlier attempt's rank 0: not the one to wait for
    monkeypatch.setattr(run_dir_module, "RANK_0_TIMEOUT", 0.3)
    with pytest.raises(BatchrunError, match=r"rank 0 did not start writing .* within 0s; see its log"):
        RunDir(store).join({}, StopFlag())
    assert RunDir(store).join({}, StopFlag(signal_name="SIGTERM")) is None
