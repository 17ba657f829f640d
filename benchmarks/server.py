"""Generation in this process against `transformers serve` (with and without `--continuous-batching`) on the same
rows, and what batchrun itself costs as a client of a server, in one invocation (issue 30).

Generation (every run gets the same rows, greedy, a fixed number of new tokens):
  in-process     `model.engine.kind: transformers`
  serve          `model.engine.kind: server`, batchrun starts `transformers serve MODEL --host 127.0.0.1 --port P`
  serve-cb       the same with `--continuous-batching`
  vllm           `model.engine.kind: vllm` (GPU only; where vllm is importable)
Each figure is the run's own clock (its summary: wall time less the time until the model was loaded or the server
answered), so start-up and model load, which no method spends per row, are left out.

Client overhead: one `transformers serve --continuous-batching` started here and given to batchrun by URL; batchrun's
generation phase (the same clock) against a minimal aiohttp client sending the same request bodies with the same
concurrency to the same server, interleaved rounds, best of each: overhead = (batchrun - direct) / direct.

Encoders (--encoders, for gpu.sh): a random MiniLM-shaped BERT (6 layers, 384 wide), batchrun against the
transformers pipeline and the limit loop of benchmarks/throughput.py, for feature-extraction and classification.

    python benchmarks/server.py --out server.json                # RESULTS.md's CPU run: 7 minutes on 2 busy cores
    python benchmarks/server.py --rows 4 --runs in-process --no-overhead --out smoke.json
    benchmarks/gpu.sh                                            # the GPU run: a 0.5B-parameter decoder, bf16
Nothing is downloaded: models and tokenizers are built here from tests/tiny_models.py's seeded builders.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import throughput  # noqa: E402  (benchmarks/throughput.py: rows, timing rounds, the pipeline and the limit loop)

BATCHRUN = [sys.executable, "-m", "pipeline_core"]
# the venv's own console script when the venv is not activated (sys.executable is its python)
SERVE_PROGRAM = str(Path(sys.executable).with_name("transformers")) if Path(sys.executable).with_name(
    "transformers").exists() else "transformers"
SERVE = [SERVE_PROGRAM, "serve", "{model}", "--host", "127.0.0.1", "--port", "{port}", "--device", "{device}"]
RUNS = ("in-process", "serve", "serve-cb", "vllm")
# On a CPU, continuous batching's KV cache takes 60-90% of the free memory by default: 15 GB here, enough for two
# servers to bring the OOM killer. 3% (about 1 GB of model process here) holds every row in flight.
CPU_CACHE_SHARE = "0.03"
MAX_LENGTH = 512  # no row reaches it (checked), so no method truncates
# decoder shapes: tiny for smoke runs, small for the CPU run (the model, not HTTP, takes most of a request), and
# Qwen2-0.5B's own (896 wide, 24 layers, 14 heads with 2 key-value heads, its 151,936-token vocabulary) for a GPU
SHAPES = {
    "tiny": ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 1024}),
    "small": ("gpt2", {"n_embd": 256, "n_layer": 4, "n_head": 4, "n_positions": 1024}),
    "qwen2-0.5b": ("qwen2", {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                             "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
                             "max_position_embeddings": 4096, "tie_word_embeddings": True}),
}
ENCODER_SHAPES = {"tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "intermediate_size": 64},
                  "minilm": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                             "intermediate_size": 1536}}


# ---- models and rows -----------------------------------------------------------------------------------------

def build_decoder(directory: Path, shape: str, dtype: str) -> str:
    """A seeded random decoder of `shape` with the byte-level BPE tokenizer of tests/tiny_models.py. Its text is
    noise; its cost per token is what counts. A vocabulary larger than the tokenizer's (Qwen2's) only means some
    generated ids decode to nothing."""
    import torch
    from tiny_models import GPT2_SPECIAL_TOKENS, byte_level_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    tokenizer = byte_level_tokenizer(GPT2_SPECIAL_TOKENS, append_eos=False)
    tokenizer.model_max_length = 1024
    family, sizes = SHAPES[shape]
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # 0.5B parameters initialise in seconds on a GPU
    with torch.device(device):
        if family == "gpt2":
            model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), **special, **sizes))
        else:
            model = Qwen2ForCausalLM(Qwen2Config(**{"vocab_size": len(tokenizer), **sizes}, **special))
    if dtype != "auto":
        model.to(getattr(torch, dtype))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def build_encoders(directory: Path, shape: str) -> dict[str, str]:
    """A seeded random BERT of `shape` with the WordPiece tokenizer of tests/tiny_models.py, saved twice: as an
    embedder and with a 2-label head."""
    from tiny_models import seeded, wordpiece_tokenizer
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    tokenizer = wordpiece_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
                        **ENCODER_SHAPES[shape])
    models = {"embedding": (BertModel, directory / "embedder"),
              "classification": (BertForSequenceClassification, directory / "classifier")}
    for model_class, path in models.values():
        seeded(model_class, config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return {workload: str(path) for workload, (_, path) in models.items()}


def prompts(count: int, seed: int, max_words: int) -> list[str]:
    """Real text of varied length: runs of 5 to max_words words from the sample articles, drawn with a fixed seed."""
    words = " ".join(json.loads(line)["text"] for line in
                     (ROOT / "data" / "articles.jsonl").read_text().splitlines()).split()
    draw = random.Random(seed)
    texts = []
    for _ in range(count):
        length = draw.randint(5, max_words)
        start = draw.randrange(len(words) - length)
        texts.append(" ".join(words[start:start + length]))
    return texts


def check_lengths(model: str, texts: list[str], limit: int = MAX_LENGTH) -> list[int]:
    """Each row's tokens; exit when one would be truncated, since then the methods would not see the same rows."""
    from transformers import AutoTokenizer

    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(model)(texts)["input_ids"]]
    if max(lengths) > limit:
        raise SystemExit(f"a row has {max(lengths)} tokens, over {limit}: lower --max-words")
    return lengths


# ---- batchrun runs ---------------------------------------------------------------------------------------------

def engine_block(run: str, args, url: str | None = None) -> str:
    """model.engine for a run; min_new_tokens reaches transformers serve inside its `generation_config` request
    field (it refuses min_tokens), so every method generates exactly --new-tokens."""
    if run == "in-process":
        return ""
    if run == "vllm":
        fields = {"kind": "vllm", "max_concurrency": args.concurrency, "request": {"ignore_eos": True},
                  "args": ["--max-model-len", "2048", "--gpu-memory-utilization", "0.85"]}
    else:
        fixed = json.dumps({"min_new_tokens": args.new_tokens})
        fields = {"kind": "server", "max_concurrency": args.concurrency, "request": {"generation_config": fixed},
                  **({"url": url} if url else {"command": serve_command(run, args)}),
                  "startup_timeout": args.startup_timeout}
    return f"  engine: {json.dumps(fields)}\n"


def serve_command(run: str, args) -> list[str]:
    if run == "serve":
        return SERVE
    cache = ["--cb-max-memory-percent", CPU_CACHE_SHARE] if args.device == "cpu" else []
    return [*SERVE, "--continuous-batching", *cache]


def write_job(directory: Path, name: str, task: str, model: str, data: Path, args, engine: str = "",
              generation: str = "", max_length: int = MAX_LENGTH) -> Path:
    job = directory / f"{name}.yaml"
    job.write_text(
        f"task: {task}\n"
        f"model:\n  name: '{model}'\n  device: {args.device}\n  dtype: {args.dtype}\n{generation}{engine}"
        f"dataset: {{path: parquet, data_files: '{data}'}}\n"
        f"batching: {{max_length: {max_length}}}\n"
        f"output: {{path: '{directory / ('out-' + name)}'}}\n")
    return job


def generation_job(directory: Path, run: str, model: str, data: Path, args, url: str | None = None) -> Path:
    served = run != "in-process"
    # a served run's min_new_tokens goes in the request (engine_block); in process generate() takes it
    fixed = "" if served else f", min_new_tokens: {args.new_tokens}"
    generation = f"  generation: {{max_new_tokens: {args.new_tokens}{fixed}, do_sample: false}}\n"
    name = "overhead" if url else run
    return write_job(directory, name, "text-generation", model, data, args, engine_block(run, args, url), generation)


def batchrun_run(job: Path) -> dict:
    """`batchrun run` of a job; its summary (JSON log line) and the request figures of its parts' metrics."""
    done = subprocess.run([*BATCHRUN, "run", str(job), "--no-progress", "--fresh", "--log-format", "json"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    summary = next((line for line in map(_json, done.stderr.splitlines()) if line.get("event") == "summary"), None)
    if done.returncode != 0 or summary is None or summary["failed_rows"]:
        raise SystemExit(f"batchrun run {job.name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    output = Path(re.search(r"path: '([^']*)'", job.read_text().split("output:")[1])[1])
    requests = [json.loads(path.read_text()).get("requests") for path in sorted(output.glob("_metrics-*.json"))]
    return {"seconds": summary["wall_seconds"] - summary["load_seconds"], "rows": summary["rows"],
            "load_seconds": summary["load_seconds"], "output": output,
            "prompt_tokens": sum(part["prompt_tokens"] for part in requests if part) if any(requests) else None,
            "completion_tokens": summary.get("completion_tokens")}


def _json(line: str) -> dict:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def texts_of(output: Path) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(output.glob("part-*.parquet")), columns=["generated_text"])
    return table.column("generated_text").to_pylist()


def generation(directory: Path, model: str, data: Path, runs: list[str], args) -> dict:
    """Each run once (a batchrun-started server per served run); rows/s, completion tokens/s, ratios to in-process,
    and how many rows' greedy text equals in-process's."""
    results, texts = {}, {}
    finished = each({run: lambda run=run: batchrun_run(generation_job(directory, run, model, data, args))
                     for run in runs}, args.overlap)
    for run, done in finished.items():
        # in process there is no `usage`: min_new_tokens = max_new_tokens makes every answer that long
        tokens = done["completion_tokens"] if run != "in-process" else done["rows"] * args.new_tokens
        results[run] = {"seconds": done["seconds"], "rows_per_second": done["rows"] / done["seconds"],
                        "completion_tokens": tokens, "completion_tokens_per_second": tokens / done["seconds"],
                        "start_seconds": done["load_seconds"]}
        texts[run] = texts_of(done["output"])
    if "in-process" in results:
        base = results["in-process"]
        for run, figures in results.items():
            figures["vs_in_process"] = figures["rows_per_second"] / base["rows_per_second"]
            figures["rows_equal_to_in_process"] = sum(a == b for a, b in zip(texts[run], texts["in-process"],
                                                                             strict=True))
    return results


# ---- batchrun against a direct client on one server --------------------------------------------------------------

async def direct_seconds(url: str, bodies: list[dict], concurrency: int) -> tuple[float, int, int]:
    """The least a client can do: every body posted at once under a semaphore of `concurrency` (and as many pooled
    connections), the answers read as JSON. Seconds from the first send to the last answer, prompt and
    completion tokens."""
    import aiohttp

    slots = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def send(body: dict) -> dict:
            async with slots, session.post(url + "/v1/completions", json=body) as response:
                response.raise_for_status()
                return (await response.json())["usage"]

        started = time.perf_counter()
        usages = await asyncio.gather(*(send(body) for body in bodies))
        seconds = time.perf_counter() - started
    return seconds, sum(u["prompt_tokens"] for u in usages), sum(u["completion_tokens"] for u in usages)


def overhead(directory: Path, model: str, data: Path, texts: list[str], args) -> dict:
    """batchrun's generation phase against the direct client, on one server started here, interleaved rounds."""
    from pipeline_core.engines.server import ServerProcess

    server = ServerProcess(serve_command("serve-cb", args), model, args.device, args.startup_timeout, restarts=0)
    server.start()
    try:
        job = generation_job(directory, "serve-cb", model, data, args, url=server.url)
        bodies = [{"model": model, "max_tokens": args.new_tokens, "temperature": 0, "prompt": text,
                   "generation_config": json.dumps({"min_new_tokens": args.new_tokens})} for text in texts]
        asyncio.run(direct_seconds(server.url, bodies[:args.concurrency], args.concurrency))  # warm the server up
        tokens = {}

        def batchrun() -> float:
            done = batchrun_run(job)
            tokens["batchrun"] = (done["prompt_tokens"], done["completion_tokens"])
            return done["seconds"]

        def direct() -> float:
            seconds, *tokens["direct"] = asyncio.run(direct_seconds(server.url, bodies, args.concurrency))
            return seconds

        try:
            times = throughput.interleaved({"batchrun": batchrun, "direct": direct}, args.overhead_rounds)
        except SystemExit as error:  # the server's side of it too
            raise SystemExit(f"{error}\nthe server (alive: {server.alive()}) wrote:\n{server.last_lines()}") from None
    finally:
        server.stop()
    if tuple(tokens["batchrun"]) != tuple(tokens["direct"]):  # then they did not send the same requests
        raise SystemExit(f"batchrun's (prompt, completion) tokens {tokens['batchrun']} differ from the direct "
                         f"client's {tokens['direct']}")
    best = {name: min(values) for name, values in times.items()}
    return {"server": "transformers serve --continuous-batching (given by url)", "concurrency": args.concurrency,
            "seconds": times, "prompt_tokens": tokens["direct"][0], "completion_tokens": tokens["direct"][1],
            "overhead": best["batchrun"] / best["direct"] - 1,
            "overhead_median": _median(times["batchrun"]) / _median(times["direct"]) - 1}


def each(calls: dict, overlap: bool) -> dict:
    """{name: call()}, one after the other; with --overlap all at once, for dry runs, whose figures mean nothing
    but which then wait for a server's start only once."""
    if not overlap:
        return {name: call() for name, call in calls.items()}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {name: pool.submit(call) for name, call in calls.items()}
        return {name: future.result() for name, future in futures.items()}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2


# ---- encoders (gpu.sh) ----------------------------------------------------------------------------------------

def encoders(directory: Path, texts: list[str], args) -> dict:
    """batchrun's own clock against throughput.py's pipeline and limit loop, per encoder workload; every method
    truncates at throughput.MAX_LENGTH (256), which no row reaches (checked)."""
    models = build_encoders(directory, args.encoder_shape)
    check_lengths(models["embedding"], texts, throughput.MAX_LENGTH)
    data = throughput.write_rows(directory / "encoder-rows.parquet", texts)
    results = {}
    for workload, task in (("embedding", "feature-extraction"), ("classification", "text-classification")):
        job = write_job(directory, workload, task, models[workload], data, args, max_length=throughput.MAX_LENGTH)
        times = throughput.interleaved(
            {"batchrun": lambda job=job: batchrun_run(job)["seconds"],
             "pipeline": lambda w=workload: throughput.pipeline_seconds(w, models[w], data, args),
             "limit": lambda w=workload: throughput.limit_seconds(w, models[w], texts, args)}, args.repeats)
        best = {name: min(values) for name, values in times.items()}
        results[workload] = {"rows": len(texts), "seconds": times,
                             "rows_per_second": {name: len(texts) / s for name, s in best.items()},
                             "batchrun_vs": {name: s / best["batchrun"] for name, s in best.items()
                                             if name != "batchrun"}}
    return results


# ---- the report ------------------------------------------------------------------------------------------------

def report(results: dict) -> None:
    print(f"\ngeneration: {results['rows']} rows, {results['new_tokens']} new tokens each, greedy, "
          f"{results['shape']} decoder, device {results['device']}")
    print(f"  {'run':<12} {'rows/s':>9} {'completion tok/s':>17} {'vs in-process':>14} {'same text':>10}")
    for run, figures in results["generation"].items():
        ratio = figures.get("vs_in_process")
        same = figures.get("rows_equal_to_in_process")
        print(f"  {run:<12} {figures['rows_per_second']:9.2f} {figures['completion_tokens_per_second']:17.1f} "
              f"{f'{ratio:.2f}x' if ratio else '-':>14} {same if same is not None else '-':>10}")
    if "overhead" in results:
        figures = results["overhead"]
        rounds = {name: " / ".join(f"{s:.2f}" for s in values) for name, values in figures["seconds"].items()}
        print(f"\nclient overhead, {figures['server']}, max_concurrency {figures['concurrency']}:")
        print(f"  batchrun generation phase  {rounds['batchrun']} s")
        print(f"  direct aiohttp client      {rounds['direct']} s")
        print(f"  overhead {100 * figures['overhead']:+.1f}% best of each, {100 * figures['overhead_median']:+.1f}% "
              "median (target: under 5%)")
    for workload, figures in results.get("encoders", {}).items():
        ratios = ", ".join(f"{ratio:.2f}x {name}" for name, ratio in figures["batchrun_vs"].items())
        print(f"\n{workload}: {figures['rows']} rows, batchrun {figures['rows_per_second']['batchrun']:.1f} rows/s "
              f"({ratios})")


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="write the figures to this JSON file")
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--max-words", type=int, default=120, help="rows are 5 to this many words (default 120)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=SHAPES, default="small", help="the decoder (default: small)")
    parser.add_argument("--runs", default="in-process,serve,serve-cb",
                        help=f"generation runs, of {', '.join(RUNS)} (default: in-process,serve,serve-cb)")
    parser.add_argument("--concurrency", type=int, default=32, help="model.engine.max_concurrency (default 32)")
    parser.add_argument("--no-overhead", action="store_true", help="skip batchrun against the direct client")
    parser.add_argument("--overhead-rounds", type=int, default=3)
    parser.add_argument("--encoders", action="store_true", help="add embedding and classification figures")
    parser.add_argument("--encoder-shape", choices=ENCODER_SHAPES, default="minilm")
    parser.add_argument("--encoder-rows", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of each encoder method (best counts)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="the models' dtype: saved in it and run in it")
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--overlap", action="store_true",
                        help="run everything at once (a dry run: every path, in one server start's time; no figure "
                             "is meaningful)")
    args = parser.parse_args()
    runs = [run for run in args.runs.split(",") if run]
    if unknown := set(runs) - set(RUNS):
        parser.error(f"--runs: unknown {', '.join(sorted(unknown))}")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")
    started = time.perf_counter()
    results = {"rows": args.rows, "new_tokens": args.new_tokens, "shape": args.shape, "device": args.device,
               "dtype": args.dtype, "seed": args.seed, "cpu_count": os.cpu_count(), "gpu": gpu_name(),
               "overlapped": args.overlap}
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        model = build_decoder(directory / "decoder", args.shape, args.dtype)
        texts = prompts(args.rows, args.seed, args.max_words)
        lengths = check_lengths(model, texts)
        results["prompt_tokens"] = {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)}
        data = throughput.write_rows(directory / "rows.parquet", texts)
        sections = {"generation": lambda: generation(directory, model, data, runs, args)}
        if not args.no_overhead:
            sections["overhead"] = lambda: overhead(directory, model, data, texts, args)
        if args.encoders:
            # shorter rows: the WordPiece vocabulary spells most words letter by letter
            sections["encoders"] = lambda: encoders(directory, prompts(args.encoder_rows, args.seed + 1, 40), args)
        results.update(each(sections, args.overlap))
    results["seconds"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(results, indent=2))
    report(results)
    print(f"\n{results['seconds']:.0f}s in all; figures in {args.out}")


if __name__ == "__main__":
    main()
