"""What `batchrun plan` costs to start on a tiny text-classification model (issue 14), against its floor: a script
that only imports torch and transformers and loads the same config, weights and tokenizer.

Each round runs both in fresh processes, one after the other (alternating which goes first), so machine noise
hits both alike. It prints:
  (a) wall and CPU seconds (user + system) of each, the median of --runs rounds, and plan / floor;
  (b) from one `python -X importtime` run of plan: the largest cumulative imports, and whether any module of the
      image stack (torchvision, transformers' image processing) or of datasets is among them.

Runs on a CPU in about two minutes (builds the tiny model of tests/tiny_models.py unless --model names one):
    python benchmarks/startup.py
    python benchmarks/startup.py --runs 3 --model /tmp/tm/<key>/text_classifier
    python benchmarks/startup.py --code /tmp/before   # the same measurement of another checkout's pipeline_core
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOOR = """
import sys, torch, transformers
name = sys.argv[1]
config = transformers.AutoConfig.from_pretrained(name)
transformers.AutoModelForSequenceClassification.from_pretrained(name, config=config, dtype=torch.float32)
transformers.AutoTokenizer.from_pretrained(name)
"""


def timed(command: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one child process; CPU from the children's rusage, so imports on both cores count."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def top_imports(command: list[str], env: dict, cwd: Path, count: int) -> tuple[list[tuple[int, int, str]], list[str]]:
    """The `count` largest cumulative imports (microseconds, depth, module), and every module imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", *command[1:]], env=env, cwd=cwd,
                            capture_output=True, text=True, check=True)
    entries = []
    for line in result.stderr.splitlines():
        if line.startswith("import time:") and "cumulative" not in line:
            _, cumulative, name = line.split("|")
            entries.append((int(cumulative), (len(name) - len(name.lstrip()) - 1) // 2, name.strip()))
    return sorted(entries, reverse=True)[:count], [name for _, _, name in entries]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", type=Path, help="a saved text-classification model (default: build a tiny one)")
    parser.add_argument("--code", type=Path, default=ROOT, help="the folder holding the pipeline_core to measure")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(args.code), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as folder:
        model = args.model
        if model is None:
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny_models import build_text_classifier

            model = build_text_classifier(Path(folder) / "text_classifier")
        job = Path(folder) / "job.yaml"
        job.write_text(f"task: text-classification\nmodel: {{name: '{model}'}}\n"
                       f"dataset: {{path: json, data_files: rows.jsonl}}\noutput: {{path: '{folder}/out'}}\n")
        plan = [sys.executable, "-m", "pipeline_core", "plan", str(job)]
        floor = [sys.executable, "-c", FLOOR, str(model)]
        timed(plan, env, args.code)  # warms the file cache for both
        rounds = []
        for index in range(args.runs):  # plan first in even rounds, the floor first in odd ones
            if index % 2:
                floor_time, plan_time = timed(floor, env, args.code), timed(plan, env, args.code)
            else:
                plan_time, floor_time = timed(plan, env, args.code), timed(floor, env, args.code)
            rounds.append((plan_time, floor_time))
        top, modules = top_imports(plan, env, args.code, args.top)

    print(f"pipeline_core from {args.code}, {args.runs} rounds, {os.cpu_count()} CPUs")
    medians = {}
    for index, name in enumerate(("plan", "floor")):
        walls = [round_[index][0] for round_ in rounds]
        medians[name] = statistics.median(walls)
        print(f"  {name:<6} wall median {medians[name]:5.2f} s  (runs {', '.join(f'{w:.2f}' for w in walls)})"
              f"   CPU median {statistics.median(round_[index][1] for round_ in rounds):5.2f} s")
    print(f"  plan / floor (wall medians): {medians['plan'] / medians['floor']:.2f}")
    print("largest cumulative imports of plan (-X importtime, ms, indented by depth):")
    for cumulative, depth, name in top:
        print(f"  {cumulative / 1000:7.0f}  {'  ' * depth}{name}")
    image = [m for m in modules if m.startswith("torchvision") or "image_processing" in m]
    print(f"image-processing modules imported: {image or 'none'}; datasets imported: {'datasets' in modules}")


if __name__ == "__main__":
    main()
