"""Image rows/s of batchrun against the transformers image-classification pipeline, side by side in one run.

Both classify the same generated JPEGs (640x480, in a Parquet file with a datasets Image feature) with the same
small ViT (hidden 192, 6 layers, 224x224, patch 16, seeded, built offline from its config) at the same batch size:
  batchrun   `batchrun run` wall time minus `batchrun plan` wall time (start-up and model load cancel out); also
             by its own clock, its summary's wall minus load: the span the pipeline's clock covers
  pipeline   transformers.pipeline("image-classification", batch_size=B) over a datasets KeyDataset of the images
Rounds are interleaved (each starts one method further along) and each method's best round counts. The labels of
the two are compared at the end, so a fast wrong answer cannot pass.

Both run with the same torch threads: the environment's (OMP_NUM_THREADS), inherited by batchrun's processes.
batchrun's DataLoader workers take one thread each whatever it says.

Setup: `pip install -e ".[images]"`.
    python benchmarks/images.py                      # 1024 images, batch 32, best of 3, ~9 minutes on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/images.py    # one torch thread for both
    python benchmarks/images.py --images 64 --repeats 1   # smoke run
    python benchmarks/images.py --workers 0,1,auto   # batchrun once per batching.num_workers setting
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCHRUN = [sys.executable, "-m", "pipeline_core"]
LABELS = [f"class-{n}" for n in range(10)]


def build_model(directory: Path) -> Path:
    """A ViT of ViT-Tiny's width with half its depth, random but seeded, and its PIL image processor."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    config = ViTConfig(image_size=224, patch_size=16, hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
                       intermediate_size=768, id2label=dict(enumerate(LABELS)),
                       label2id={label: n for n, label in enumerate(LABELS)})
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(directory)
    ViTImageProcessorPil(size={"height": 224, "width": 224}).save_pretrained(directory)
    return directory


def jpeg(seed: int, size=(640, 480)) -> bytes:
    """A photo-like picture: smooth colour gradients, a few shapes and sensor noise, JPEG quality 90."""
    import numpy as np
    from PIL import Image, ImageDraw

    generator = np.random.default_rng(seed)
    width, height = size
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    base = np.stack([255 * (a * x + (1 - a) * y) for a in generator.random(3)], axis=-1)
    image = Image.fromarray(np.clip(base + generator.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        left, top = int(generator.integers(0, width - 60)), int(generator.integers(0, height - 60))
        box = (left, top, left + int(generator.integers(30, 200)), top + int(generator.integers(30, 200)))
        colour = tuple(int(c) for c in generator.integers(0, 256, 3))
        (draw.ellipse if generator.random() < 0.5 else draw.rectangle)(box, fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_images(path: Path, count: int) -> Path:
    import datasets

    features = datasets.Features({"id": datasets.Value("int64"), "image": datasets.Image()})
    rows = {"id": list(range(count)), "image": [{"bytes": jpeg(n), "path": None} for n in range(count)]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def write_job(directory: Path, model: Path, data: Path, batch_size: int, workers: str, rows_per_part: int) -> Path:
    job = directory / f"images-{workers}.yaml"
    job.write_text(json.dumps({
        "task": "image-classification",
        "model": {"name": str(model)},
        "dataset": {"path": "parquet", "data_files": str(data), "keep_columns": ["id"]},
        "batching": {"max_batch_size": batch_size, "num_workers": workers if workers == "auto" else int(workers)},
        "output": {"path": str(directory / f"out-{workers}"), "rows_per_part": rows_per_part},
    }))
    return job


def seconds(command: list[str]) -> tuple[float, str]:
    """Wall seconds of the command, and its stderr."""
    started = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - started, result.stderr


def batchrun_seconds(job: Path, choices: list[str], own: list[float]) -> float:
    """run minus plan. What num_workers auto chose, if it did, goes to `choices`; the run's own clock, its summary's
    wall minus load (from the end of loading the model to the end: what the pipeline's clock spans), to `own`."""
    plan, _ = seconds([*BATCHRUN, "plan", str(job)])
    run, log = seconds([*BATCHRUN, "run", str(job), "--no-progress", "--fresh", "--log-format", "json"])
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    choices += [event["message"] for event in events if event.get("event") == "workers_chosen"]
    summary = next(event for event in events if event.get("event") == "summary")
    own.append(summary["wall_seconds"] - summary["load_seconds"])
    return run - plan


def pipeline_labels(model: Path, data: Path, batch_size: int) -> tuple[float, list[str]]:
    """Seconds the pipeline takes over the images (model loaded before the clock starts), and its top labels."""
    import datasets
    from transformers import pipeline
    from transformers.pipelines.pt_utils import KeyDataset

    images = datasets.load_dataset("parquet", data_files=str(data), split="train")
    classify = pipeline("image-classification", model=str(model), batch_size=batch_size)
    started = time.perf_counter()
    labels = [scores[0]["label"] for scores in classify(KeyDataset(images, "image"), top_k=1)]
    return time.perf_counter() - started, labels


def interleaved(methods: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each method in each round; each round starts one method further along, so that a slow spell of
    a shared machine cannot land on one method every time."""
    names = list(methods)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(methods[name]())
            print(f"  round {round_ + 1} {name}: {times[name][-1]:.2f}s", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024,
                        help="fixed costs (importing datasets, two model loads' spread) weigh less the more images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; each method's best counts")
    parser.add_argument("--workers", default="auto", help="batchrun's batching.num_workers, comma-separated")
    parser.add_argument("--parts", type=int, default=4,
                        help="rows_per_part = images / parts: num_workers auto measures the first part, then switches")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="batchrun-images-") as temporary:
        directory = Path(temporary)
        model = build_model(directory / "vit")
        data = write_images(directory / "images.parquet", args.images)
        rows_per_part = -(-args.images // args.parts)
        settings = args.workers.split(",")
        jobs = {setting: write_job(directory, model, data, args.batch_size, setting, rows_per_part)
                for setting in settings}
        labels: dict[str, list[str]] = {}

        def pipeline_run() -> float:
            elapsed, labels["pipeline"] = pipeline_labels(model, data, args.batch_size)
            return elapsed

        choices: list[str] = []
        own: dict[str, list[float]] = {f"batchrun (num_workers {s})": [] for s in jobs}
        methods = {name: (lambda job=job, name=name: batchrun_seconds(job, choices, own[name]))
                   for name, job in zip(own, jobs.values(), strict=True)}
        methods["pipeline"] = pipeline_run
        print(f"{args.images} JPEGs of 640x480, batch size {args.batch_size}, {rows_per_part} rows per part, "
              f"best of {args.repeats} interleaved rounds", flush=True)
        times = interleaved(methods, args.repeats)

        import pandas as pd

        rates = {name: args.images / min(values) for name, values in times.items()}
        for setting, job in jobs.items():
            result = pd.read_parquet(job.parent / f"out-{setting}").sort_values("id")
            agree = sum(a == b for a, b in zip(result["label"], labels["pipeline"], strict=True))
            print(f"batchrun (num_workers {setting}) labels equal the pipeline's on {agree} of {args.images} images")
        for choice in choices:
            print(f"batchrun logged: {choice}")
        print()
        for name, rate in rates.items():
            ratio = rate / rates["pipeline"]
            print(f"{name:28s} {rate:8.1f} images/s   {ratio:.2f}x the pipeline   "
                  f"(rounds: {', '.join(f'{args.images / s:.1f}' for s in times[name])})")
        print("\nbatchrun by its own clock (wall - load in its summary):")
        own_rates = {name: args.images / min(values) for name, values in own.items()}
        for name, rate in own_rates.items():
            print(f"{name:28s} {rate:8.1f} images/s   {rate / rates['pipeline']:.2f}x the pipeline   "
                  f"(rounds: {', '.join(f'{args.images / s:.1f}' for s in own[name])})")
        if args.json:
            args.json.write_text(json.dumps({"images": args.images, "batch_size": args.batch_size,
                                             "rows_per_part": rows_per_part, "seconds": times,
                                             "own_clock_seconds": own, "images_per_second": rates,
                                             "own_clock_images_per_second": own_rates, "auto_chose": choices},
                                            indent=2))


if __name__ == "__main__":
    main()
