"""The command line as schedulers see it: exit codes, `batchrun JOB.yaml` as `run`, no tracebacks."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_core import cli
from pipeline_core.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
SUMMARIZE = str(ROOT / "jobs" / "summarize.yaml")


def batchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real entry point, `python -m pipeline_core`, in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline_core", *args],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})}, timeout=120,
    )


def test_validate_shipped_jobs_in_a_child_process():
    jobs = sorted(str(path) for path in (ROOT / "jobs").glob("*.yaml"))
    result = batchrun("validate", *jobs)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": ok (") == len(jobs)


def test_bad_manifest_in_a_child_process_exits_2_without_traceback(tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text("task: summarization\nmodel: {name: m}\ndataset: {path: json}\nbatching: {max_tokens: -5}\n")
    for args in (["validate", str(job)], [str(job)], ["run", str(job), "--limit", "3"]):
        result = batchrun(*args)
        assert result.returncode == 2
        assert "batching.max_tokens must be auto or a positive integer, got -5" in result.stderr
        assert "Traceback" not in result.stderr


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("batchrun")
    if not script.exists():
        pytest.skip("batchrun is not installed in this environment (pip install -e .)")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "batchrun" in result.stdout


def test_evaluate_of_a_directory_without_a_run_exits_2(capsys, tmp_path):
    assert run_cli(["evaluate", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert "holds no batchrun run (no _batchrun.json)" in err and out == ""


SCHEDULER_VARIABLES = ("JOB_COMPLETION_INDEX", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_COUNT",
                       "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture
def no_scheduler_environment(monkeypatch):
    """Neither a launcher nor a scheduler around: the test sets the variables it needs."""
    for variable in SCHEDULER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


@pytest.fixture
def started_runs(no_scheduler_environment):
    """The layout each `batchrun run` would start with, and the log line it wrote: run_job stands in for the run."""
    from pipeline_core import runner

    started = []

    def run_job(job, options):
        logging.getLogger("batchrun").info("started %s", job.get("name"))
        started.append(options.layout)
        return 0

    no_scheduler_environment.setattr(runner, "run_job", run_job)
    yield started
    cli.setup_logging()  # later tests' log lines untagged, as a plain run writes them


@pytest.mark.parametrize("args, env, shard, tag", [
    (["--num-shards", "3", "--shard-index", "1"], {}, (1, 3), "batchrun[shard 1/3]"),
    (["--num-shards", "1", "--shard-index", "0"], {}, (0, 1), "batchrun"),
    (["--num-shards", "4", "--shard-index", "auto"], {"JOB_COMPLETION_INDEX": "3"}, (3, 4), "batchrun[shard 3/4]"),
    (["--num-shards", "auto", "--shard-index", "auto"],
     {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4),
     "batchrun[shard 2/4]"),  # an array numbered 3-6: its third task
    (["--num-shards", "auto", "--shard-index", "auto"],
     {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}, (0, 2), "batchrun[shard 0/2]"),
    (["--num-shards", "2", "--shard-index", "auto"],
     {"JOB_COMPLETION_INDEX": "1", "SLURM_ARRAY_TASK_ID": "0"}, (1, 2), "batchrun[shard 1/2]"),  # Kubernetes first
    ([], {}, (0, 1), "batchrun"),
    ([], {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, (0, 1), "batchrun[rank 1/2]"),
    (["--num-shards", "2", "--shard-index", "1"], {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, (1, 2),
     "batchrun[shard 1/2 rank 0/4]"),
])
def test_shards_and_launcher_ranks_reach_the_run_and_tag_its_log_lines(started_runs, monkeypatch, capsys, args, env,
                                                                      shard, tag):
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    assert run_cli(["run", SUMMARIZE, *args]) == 0
    [layout] = started_runs
    assert (layout.shard_index, layout.num_shards) == shard
    assert (layout.rank, layout.world_size) == (int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)))
    assert re.fullmatch(rf"\d\d:\d\d:\d\d {re.escape(tag)} INFO started summarize-articles\n", capsys.readouterr().err)


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", SUMMARIZE, "--limit", "0"], "Invalid value for '--limit'"),
        (["run", SUMMARIZE, "--num-shards", "2"], "--num-shards and --shard-index go together"),
        (["run", SUMMARIZE, "--shard-index", "0"], "--num-shards and --shard-index go together"),
        (["run", SUMMARIZE, "--num-shards", "2", "--shard-index", "2"],
         "--shard-index must be below --num-shards (2), got 2"),
        (["run", SUMMARIZE, "--num-shards", "0", "--shard-index", "0"],
         "--num-shards must be an integer of at least 1, got '0'"),
        (["run", SUMMARIZE, "--num-shards", "two", "--shard-index", "0"],
         "--num-shards must be an integer of at least 1, got 'two'"),
        (["run", SUMMARIZE, "--num-shards", "2", "--shard-index", "-1"],
         "--shard-index must be an integer of at least 0, got '-1'"),
        (["run", SUMMARIZE, "--num-shards", "auto", "--shard-index", "0"],
         "--num-shards auto reads SLURM_ARRAY_TASK_COUNT (a Slurm job array), which is not set"),
        (["run", SUMMARIZE, "--num-shards", "2", "--shard-index", "auto"],
         "--shard-index auto reads JOB_COMPLETION_INDEX (a Kubernetes indexed Job) or SLURM_ARRAY_TASK_ID "
         "(a Slurm job array); neither is set"),
        (["run", SUMMARIZE, "--log-format", "xml"], "Invalid value for '--log-format'"),
        (["run"], "Missing argument 'JOB.yaml'"),
        (["validate"], "Missing argument"),
        (["run", SUMMARIZE, "--no-such-option"], "No such option"),
    ],
)
def test_usage_errors_exit_2(capsys, no_scheduler_environment, args, message):
    assert run_cli(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_output_option_is_a_manifest_override(capsys):
    # an empty --output is refused by validation, before any model loads
    assert run_cli(["run", SUMMARIZE, "--output", ""]) == 2
    assert "output.path must be a non-empty string" in capsys.readouterr().err


COMMANDS = ("run", "validate", "plan", "status", "report", "evaluate")


def _words(text: str) -> str:
    return " ".join(text.split())


def test_help_lists_every_command_by_its_whole_first_sentence(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert set(cli.cli.commands) == set(COMMANDS)
    assert run_cli(["--help"]) == 0
    listing = capsys.readouterr().out.partition("\nCommands:\n")[2]
    lines = listing.splitlines()
    assert lines and not [line for line in lines if line.rstrip().endswith("...") or len(line) > 80]
    for name in COMMANDS:
        first_sentence = re.match(r".+?\.(?=\s|$)", cli.cli.commands[name].help, re.DOTALL).group()
        assert f"{name} {_words(first_sentence)}" in _words(listing)


@pytest.mark.parametrize("name", COMMANDS)
def test_each_command_help_shows_its_whole_docstring(name, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert run_cli([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Usage: batchrun {name} [OPTIONS]")
    assert _words(cli.cli.commands[name].help) in _words(out)


def test_internal_error_is_one_line_unless_debugging(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("wiring is wrong")

    monkeypatch.setattr(cli, "load_job", broken)
    monkeypatch.delenv("BATCHRUN_DEBUG", raising=False)
    assert run_cli(["validate", SUMMARIZE]) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: wiring is wrong" in err and "Traceback" not in err
    monkeypatch.setenv("BATCHRUN_DEBUG", "1")
    assert run_cli(["validate", SUMMARIZE]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_interrupt_exits_75(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_job", interrupted)
    assert run_cli(["validate", SUMMARIZE]) == 75


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = quickstart.strip().splitlines()
    assert len(commands) == 2
    test_command = commands[1].split(" && ")[-1]
    assert test_command == "python -m pytest -q"
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_docs_claims_table_names_tests_that_exist():
    page = (ROOT / "docs" / "development.md").read_text()
    table = page.split("Where each claim of the README and these pages is tested", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) >= 20
    current_file = None
    for row in rows:
        for name in re.findall(r"`([\w./:]+)`", row.rsplit(" | ", 1)[1]):
            file, _, test = name.partition("::")
            if file.endswith(".py"):
                current_file = ROOT / "tests" / file
                assert current_file.is_file(), f"docs/development.md names {file}, which is not in tests/"
            else:  # a bare test name belongs to the file named before it in the same row
                file, test = current_file.name, name
            if test:
                assert re.search(rf"^def {test}\(", current_file.read_text(), re.M), f"no {test} in {file}"
