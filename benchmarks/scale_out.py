"""Scale-out on a CPU: how fast a rerun reaches new work, what one shard reads, and a slow process under claims vs
a static split. Every figure comes from `batchrun run` processes and their log lines.

1. Rerun latency. 600,000 rows of short text (5 to 40 words, every word one token of the tiny WordPiece
   vocabulary) in 6 Parquet files, rows_per_part 50,000 (12 parts), text-classification with the tiny text
   classifier. The job is run once to the end; copies of its output with part 11 (or parts 5-11) and _SUCCESS
   removed are the "11 of 12" (or "5 of 12") states, and an empty output is "0 of 12", the cost of preparing one
   part with nothing to skip. Each rerun is stopped (SIGKILL to its process group) as soon as it logs "first part
   to compute (part K) ready A s after the run started, B s after the model was loaded"; B is the figure. Readers:
   the Parquet row-group reader (default) and, for 11 of 12, the sequential datasets stream, forced by a wrapper
   that makes `pipeline_core.data.source.find_parquet` answer None; `batching.num_workers` 2 and 0. Then, in this
   process, what B is made of: part 11's table through each source, and preparing one part.
4. The same rerun with the rows as JSON lines (6 files, read in sequence), from its own full run.
2. Shard reading. `--num-shards 6 --shard-index 0` on a fresh output: the row groups, rows and MB its "computed N
   parts ... read R input rows in G row groups (X MB)" line reports, against the full run's line and against all
   12 parts counted by the reader in this process; with pyarrow's default row groups and with row_group_size 10,000.
3. Straggler. 2048 rows, rows_per_part 64 (32 parts), text-generation with the tiny GPT-2, 16 new tokens
   (min = max, greedy), num_workers 0, OMP_NUM_THREADS=1 per process (two processes, two cores). The slow
   process runs with `--set batching.max_tokens=96` (96 padded prompt tokens a batch: one to three rows, a few
   more when short; about 3x slower a part), the fast one with the default (64 rows a batch).
   (a) static: `--num-shards 2`, shard 0 slow and shard 1 fast, started together; (b) claims: two plain `run`
   processes, slow and fast, started together; (c) as (b) with num_workers 2 (the default), whose workers claim
   parts ahead. Wall time until both exit and until _SUCCESS exists, parts computed by each, and each output
   against a single-process run (pandas, sorted by row_id).

Rounds are interleaved (each round starts one configuration further along) and the best round counts.

Run on a CPU from the repository root (23.8 minutes on a 2-core machine shared with another engineer's tests, over
half of it the two full runs of 600,000 rows; the tiny models are built in the work folder, nothing is downloaded):

    PYTHONPATH=. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        python benchmarks/scale_out.py --json scale_out.json
    python benchmarks/scale_out.py --sections straggler --rounds 3     # one section only

--models DIR reuses tiny models already built by tests/tiny_models.py (build_all); --keep keeps the work folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

ROWS, FILES, ROWS_PER_PART = 600_000, 6, 50_000
PARTS = ROWS // ROWS_PER_PART
GEN_ROWS, GEN_ROWS_PER_PART = 2048, 64
SLOW_MAX_TOKENS = 96  # about 3x slower a part than the default here (2.6-3.4x, side by side)
FIRST = re.compile(r"first part to compute \(part (\d+)\) ready ([\d.]+)s after the run started, ([\d.]+)s after "
                   r"the model was loaded")
COMPUTED = re.compile(r"computed (\d+) parts \((\d+) rows\) here(?:; read (\d+) input rows in (\d+) row groups "
                      r"\(([\d.]+) MB\))?")
# the old sequential path: no Parquet reader, so datasets streams the files from their first row
SEQUENTIAL = ("import sys, pipeline_core.data.source as source; source.find_parquet = lambda *args, **kwargs: None; "
              "from pipeline_core.entry import main; main(sys.argv[1:])")


def environment(**extra: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


def batchrun(job: Path, *args: str, sequential: bool = False) -> list[str]:
    head = [sys.executable, "-c", SEQUENTIAL] if sequential else [sys.executable, "-m", "pipeline_core"]
    return [*head, "run", str(job), "--no-progress", *args]


def start(command: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Its own session, so that it and its DataLoader workers can be stopped as one group."""
    with open(log, "w") as stderr:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
                                env=env or environment(), start_new_session=True)


def stop_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def run_to_end(command: list[str], log: Path, env: dict | None = None) -> tuple[float, str]:
    began = time.perf_counter()
    process = start(command, log, env)
    code = process.wait()
    text = log.read_text()
    if code != 0:
        raise SystemExit(f"{' '.join(command)} exited {code}:\n{text[-3000:]}")
    return time.perf_counter() - began, text


def computed(text: str) -> dict:
    match = COMPUTED.search(text)
    if not match:
        raise SystemExit(f"no 'computed N parts' line in:\n{text[-3000:]}")
    parts, rows, read_rows, groups, mb = match.groups()
    figures = {"parts": int(parts), "rows": int(rows)}
    if read_rows is not None:
        figures.update(read_rows=int(read_rows), row_groups=int(groups), mb=float(mb))
    return figures


# ---------------------------------------------------------------------------------------------------- inputs, jobs

def vocabulary() -> list[str]:
    """Words that are one token each in the tiny WordPiece vocabulary (tests/tiny_models.py)."""
    from tiny_models import CORPUS

    return sorted({word for line in CORPUS for word in re.findall(r"[a-z]+", line.lower())})


def texts(count: int, seed: int) -> list[str]:
    words, generator = vocabulary(), random.Random(seed)
    return [" ".join(generator.choices(words, k=generator.randint(5, 40))) for _ in range(count)]


def write_inputs(folder: Path) -> dict[str, list[Path]]:
    """The same 600,000 rows three ways: Parquet with pyarrow's default row groups, Parquet with row groups of
    10,000 rows, and JSON lines; 6 files each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    every = texts(ROWS, seed=0)
    per_file = ROWS // FILES
    inputs: dict[str, list[Path]] = {"parquet": [], "parquet_rg10k": [], "json": []}
    for file in range(FILES):
        first = file * per_file
        table = pa.table({"id": range(first, first + per_file), "text": every[first:first + per_file]})
        for kind, size in (("parquet", None), ("parquet_rg10k", 10_000)):
            path = folder / f"{kind}-{file}.parquet"
            pq.write_table(table, path, row_group_size=size)
            inputs[kind].append(path)
        path = folder / f"rows-{file}.jsonl"
        path.write_text("".join(json.dumps({"id": first + row, "text": text}) + "\n"
                                for row, text in enumerate(every[first:first + per_file])))
        inputs["json"].append(path)
    generated = pa.table({"id": range(GEN_ROWS), "text": texts(GEN_ROWS, seed=1)})
    inputs["generation"] = [folder / "prompts.parquet"]
    pq.write_table(generated, inputs["generation"][0])
    return inputs


def write_job(path: Path, task: str, model: Path, builder: str, files: list[Path], rows_per_part: int,
              extra: str = "") -> Path:
    listed = ", ".join(f"'{file}'" for file in files)
    path.write_text(
        f"task: {task}\nmodel:\n  name: '{model}'\n{extra}"
        f"dataset:\n  path: {builder}\n  data_files: [{listed}]\n  keep_columns: [id]\n"
        f"output:\n  path: '{path.with_suffix('')}-out'\n  rows_per_part: {rows_per_part}\n"
    )
    return path


def models(folder: Path, reuse: str | None) -> dict[str, Path]:
    from tiny_models import BUILDERS

    if reuse:
        return {name: Path(reuse) / name for name in ("text_classifier", "causal_lm")}
    return {name: BUILDERS[name](folder / name) for name in ("text_classifier", "causal_lm")}


# ---------------------------------------------------------------------------------------------------- 1 and 4: reruns

def committed_state(full: Path, target: Path, keep: int) -> Path:
    """A copy of a finished output with parts keep..11 and _SUCCESS removed: `keep` of 12 parts committed."""
    if keep == 0:
        target.mkdir(parents=True)
        return target
    shutil.copytree(full, target)
    (target / "_SUCCESS").unlink()
    for index in range(keep, PARTS):
        (target / f"part-{index:06d}.parquet").unlink()
    return target


def first_ready(job: Path, state: Path, scratch: Path, workers: int, sequential: bool) -> dict:
    """Rerun `job` on a copy of `state` until it logs its first part to compute; then stop it."""
    output = scratch / "out"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    shutil.copytree(state, output)
    log = scratch / "log.txt"
    began = time.perf_counter()
    process = start(batchrun(job, "--output", str(output), "--set", f"batching.num_workers={workers}",
                             sequential=sequential), log)
    try:
        while True:
            text = log.read_text()
            if match := FIRST.search(text):
                wall = time.perf_counter() - began
                break
            if process.poll() is not None:
                raise SystemExit(f"the rerun ended (exit {process.returncode}) before its first part:\n{text[-3000:]}")
            time.sleep(0.05)
    finally:
        stop_group(process)
    shutil.rmtree(scratch, ignore_errors=True)
    return {"part": int(match[1]), "after_start": float(match[2]), "after_load": float(match[3]), "wall": wall}


def reruns(work: Path, jobs: dict[str, Path], rounds: int) -> dict:
    """Full runs of the Parquet and JSON jobs, then interleaved reruns from 0, 5 and 11 committed parts."""
    results: dict = {"full_runs": {}}
    states: dict[tuple[str, int], Path] = {}
    for kind in ("parquet", "json"):
        output = work / f"full-{kind}"
        seconds, text = run_to_end(batchrun(jobs[kind], "--output", str(output)), work / f"full-{kind}.log")
        results["full_runs"][kind] = {"seconds": round(seconds, 1), **computed(text)}
        print(f"full run, {kind}: {seconds:.1f}s, {computed(text)}", flush=True)
        for keep in ((0, 5, 11) if kind == "parquet" else (0, 11)):
            states[(kind, keep)] = committed_state(output, work / f"state-{kind}-{keep}", keep)
    configs = []  # (label, input, reader, committed, workers)
    for workers in (2, 0):
        configs += [("parquet reader", "parquet", False, keep, workers) for keep in (0, 5, 11)]
        configs.append(("sequential (patched)", "parquet", True, 11, workers))
        configs += [("JSON lines", "json", False, keep, workers) for keep in (0, 11)]
    measured: dict[str, list] = {}
    for round_index in range(rounds):
        shift = round_index * len(configs) // rounds
        for label, kind, sequential, keep, workers in configs[shift:] + configs[:shift]:
            figures = first_ready(jobs[kind], states[(kind, keep)], work / "scratch", workers, sequential)
            key = f"{label} | {keep} of {PARTS} committed | num_workers {workers}"
            measured.setdefault(key, []).append(figures)
            print(f"round {round_index + 1}: {key}: part {figures['part']} ready {figures['after_load']:.2f}s "
                  f"after the model was loaded ({figures['after_start']:.1f}s after the run started)", flush=True)
    results["breakdown"] = breakdown(jobs)
    results["first_part"] = {key: {"best_after_load": min(f["after_load"] for f in rounds_),
                                   "rounds_after_load": [f["after_load"] for f in rounds_],
                                   "best_after_start": min(f["after_start"] for f in rounds_),
                                   "part": rounds_[0]["part"]}
                             for key, rounds_ in measured.items()}
    return results


def best_of(repeats: int, action) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        action()
        times.append(time.perf_counter() - began)
    return min(times)


def breakdown(jobs: dict[str, Path], repeats: int = 3) -> dict:
    """In this process, what the rerun's figure is made of: getting part 11's table from each source (opening the
    split included), and preparing one 50,000-row part (tokenizing, packing, padding), as num_workers 0 does it."""
    import pipeline_core.data.source as source
    from pipeline_core.data.loader import BatchLimits, prepare_part
    from pipeline_core.initializer import initialize
    from pipeline_core.manifest import load_job
    from pipeline_core.tasks import build_task

    last = PARTS - 1
    parquet, json_lines = load_job(str(jobs["parquet"]), []), load_job(str(jobs["json"]), [])

    def through(job) -> object:
        split = source.open_split(job)
        if split.random_access:
            return split.read_part(last, ROWS_PER_PART)
        return next(table for _, table in split.parts(ROWS_PER_PART, lambda index: index == last))

    def streamed() -> object:
        found, source.find_parquet = source.find_parquet, lambda *args, **kwargs: None
        try:
            return through(parquet)
        finally:
            source.find_parquet = found

    table = through(parquet)
    assert table.equals(streamed()), "the reader's part 11 differs from the stream's"
    task = build_task(parquet, initialize(parquet), should_stop=lambda: False)
    figures = {"part 11, Parquet reader (open split + read part)": best_of(repeats, lambda: through(parquet)),
               "part 11, datasets Parquet stream (find_parquet patched)": best_of(repeats, streamed),
               "part 11, datasets JSON-lines stream": best_of(repeats, lambda: through(json_lines)),
               "prepare one 50,000-row part (tokenize, pack, pad)": best_of(repeats, lambda: prepare_part(
                   last, last * ROWS_PER_PART, table, task, ["id"], BatchLimits(4096, 64)))}
    for name, seconds in figures.items():
        print(f"breakdown: {name}: {seconds:.2f}s", flush=True)
    return {name: round(seconds, 3) for name, seconds in figures.items()}


# ---------------------------------------------------------------------------------------------------- 2: shard reads

def reader_totals(job: Path) -> dict:
    """Every part read by the row-group reader in this process: what a single process reading all parts counts."""
    from pipeline_core.data.source import open_split
    from pipeline_core.manifest import load_job

    split = open_split(load_job(str(job), []))
    for index in range(PARTS):
        split.read_part(index, ROWS_PER_PART)
    read = split.reads()
    return {"row_groups": read.row_groups, "read_rows": read.rows, "mb": round(read.bytes / 1e6, 1),
            "bytes": read.bytes}


def shard_reads(work: Path, jobs: dict[str, Path]) -> dict:
    import pyarrow.parquet as pq

    results = {}
    for kind in ("parquet", "parquet_rg10k"):
        footer = pq.read_metadata(jobs[f"{kind}_files"][0])
        seconds, text = run_to_end(batchrun(jobs[kind], "--output", str(work / f"shard0-{kind}"), "--num-shards",
                                            "6", "--shard-index", "0"), work / f"shard0-{kind}.log")
        results[kind] = {"row_groups_per_file": footer.num_row_groups,
                         "rows_per_row_group": footer.row_group(0).num_rows,
                         "shard_0_of_6": computed(text), "shard_seconds": round(seconds, 1),
                         "all_parts_reader": reader_totals(jobs[kind])}
        print(f"shard reads, {kind}: {results[kind]}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------- 3: straggler

def together(commands: dict[str, list[str]], output: Path, folder: Path, env: dict) -> dict:
    """Start the commands at once; seconds until each exits and until _SUCCESS exists, and each one's parts."""
    logs = {name: folder / f"{name}.log" for name in commands}
    began = time.perf_counter()
    processes = {name: start(command, logs[name], env) for name, command in commands.items()}
    exits: dict[str, float] = {}
    ready: dict[str, float] = {}  # when each one's "first part to compute" line appeared
    success = None
    while len(exits) < len(processes) or success is None:
        now = time.perf_counter() - began
        for name in processes:
            if name not in ready and FIRST.search(logs[name].read_text()):
                ready[name] = now
        for name, process in processes.items():
            if name not in exits and process.poll() is not None:
                exits[name] = now
                if process.returncode != 0:
                    for other in processes.values():
                        stop_group(other)
                    raise SystemExit(f"{name} exited {process.returncode}:\n{logs[name].read_text()[-3000:]}")
        if success is None and (output / "_SUCCESS").exists():
            success = now
        if now > 900:
            for process in processes.values():
                stop_group(process)
            raise SystemExit("the straggler runs took over 15 minutes")
        time.sleep(0.05)
    parts = {name: computed(logs[name].read_text())["parts"] for name in commands}
    # seconds per part from the first part ready to the exit: a process's own pace where it never waits (static)
    pace = {name: round((exits[name] - ready[name]) / parts[name], 3) for name in commands
            if parts[name] and name in ready}
    return {"both_exited": round(max(exits.values()), 2), "success": round(success, 2),
            "exits": {name: round(seconds, 2) for name, seconds in exits.items()}, "parts": parts,
            "seconds_per_part": pace}


def same_output(output: Path, reference: Path) -> bool:
    import pandas as pd

    def read(path: Path):
        return pd.read_parquet(path).sort_values("row_id").reset_index(drop=True)

    return read(output).equals(read(reference))


def straggler(work: Path, job: Path, rounds: int) -> dict:
    env = environment(OMP_NUM_THREADS="1")  # two processes, two cores: one each
    slow = ("--set", f"batching.max_tokens={SLOW_MAX_TOKENS}")
    reference = work / "gen-single"
    seconds, _ = run_to_end(batchrun(job, "--output", str(reference), "--set", "batching.num_workers=0"),
                            work / "gen-single.log", env)
    results: dict = {"single_fast_process_seconds": round(seconds, 1), "runs": {}}
    print(f"straggler: one fast process alone, {GEN_ROWS // GEN_ROWS_PER_PART} parts: {seconds:.1f}s", flush=True)

    def commands(mode: str, output: Path) -> dict[str, list[str]]:
        base = ("--output", str(output))
        if mode == "static":
            workers = ("--set", "batching.num_workers=0")
            return {"slow": batchrun(job, *base, *workers, *slow, "--num-shards", "2", "--shard-index", "0"),
                    "fast": batchrun(job, *base, *workers, "--num-shards", "2", "--shard-index", "1")}
        workers = ("--set", f"batching.num_workers={2 if mode == 'claims, num_workers 2' else 0}")
        return {"slow": batchrun(job, *base, *workers, *slow), "fast": batchrun(job, *base, *workers)}

    modes = ["static", "claims", "claims, num_workers 2"]
    for round_index in range(rounds):
        shift = round_index % len(modes)
        for mode in modes[shift:] + modes[:shift]:
            folder = work / f"straggler-{round_index}-{mode.replace(', ', '-').replace(' ', '')}"
            folder.mkdir()
            output = folder / "out"
            figures = together(commands(mode, output), output, folder, env)
            figures["equals_single_process"] = same_output(output, reference)
            results["runs"].setdefault(mode, []).append(figures)
            print(f"round {round_index + 1}: {mode}: {figures}", flush=True)
            shutil.rmtree(folder)
    results["static_slow_vs_fast_per_part"] = [
        round(figures["seconds_per_part"]["slow"] / figures["seconds_per_part"]["fast"], 2)
        for figures in results["runs"]["static"] if len(figures["seconds_per_part"]) == 2]
    results["best"] = {mode: min(runs, key=lambda figures: figures["success"])
                       for mode, runs in results["runs"].items()}
    return results


# ---------------------------------------------------------------------------------------------------- main

def versions() -> dict:
    import datasets
    import pyarrow
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "datasets": datasets.__version__, "pyarrow": pyarrow.__version__, "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="rerun,shards,straggler",
                        help="comma-separated: rerun (items 1 and 4), shards (2), straggler (3)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the rerun and straggler measurements")
    parser.add_argument("--models", help="a folder of tiny models from tests/tiny_models.build_all (else built here)")
    parser.add_argument("--workdir", help="work folder (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--smoke", action="store_true", help="a tenth of the rows, to check the script itself")
    args = parser.parse_args()
    if args.smoke:
        global ROWS, ROWS_PER_PART, GEN_ROWS, GEN_ROWS_PER_PART
        ROWS, ROWS_PER_PART, GEN_ROWS, GEN_ROWS_PER_PART = ROWS // 10, ROWS_PER_PART // 10, GEN_ROWS // 8, 16
    os.environ.update(environment())  # this process imports the libraries too (tiny models, reader counts)
    sections = set(args.sections.split(","))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="scale-out-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    results: dict = {"versions": versions(), "rounds": args.rounds}
    print(results["versions"], flush=True)
    try:
        tiny = models(work / "models", args.models)
        inputs = write_inputs(work / "inputs")
        classify = {kind: write_job(work / f"classify-{kind}.yaml", "text-classification", tiny["text_classifier"],
                                    "json" if kind == "json" else "parquet", inputs[kind], ROWS_PER_PART)
                    for kind in ("parquet", "parquet_rg10k", "json")}
        classify.update({f"{kind}_files": inputs[kind] for kind in ("parquet", "parquet_rg10k")})
        generation = write_job(work / "generate.yaml", "text-generation", tiny["causal_lm"], "parquet",
                               inputs["generation"], GEN_ROWS_PER_PART,
                               "  generation: {max_new_tokens: 16, min_new_tokens: 16, do_sample: false}\n")
        if "rerun" in sections:
            results["rerun"] = reruns(work, classify, args.rounds)
        if "shards" in sections:
            results["shards"] = shard_reads(work, classify)
            if "rerun" in results:
                results["shards"]["parquet"]["full_run"] = results["rerun"]["full_runs"]["parquet"]
        if "straggler" in sections:
            results["straggler"] = straggler(work, generation, args.rounds)
        results["seconds"] = round(time.perf_counter() - began, 1)
        print(json.dumps(results, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
