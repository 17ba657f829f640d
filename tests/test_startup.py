"""Start-up (issue 14): a text job imports nothing of the image stack beyond what transformers imports on its own.

transformers itself imports PIL.Image at `import transformers` and PIL.ImageOps with `transformers.image_transforms`
from its modeling code, whatever the model; those are the baseline. Each check runs the commands in a fresh child
process, since this test session has long imported everything. Timing lives in benchmarks/startup.py, not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from jobs import ROOT, manifest, rows, write_job, write_manifest

# In the child: the image modules loaded after each command, the baseline first.
PROBE = """
import json, sys
from pipeline_core.cli import run_cli

def loaded():
    image = sorted(m for m in sys.modules if m.split(".")[0] in {"PIL", "torchvision"}
                   or "image_processing" in m or "image_transforms" in m)
    return {"image": image, "datasets": "datasets" in sys.modules}

import transformers.modeling_utils  # what loading any model imports, transformers' own image modules included
seen = {"transformers": loaded()}
for name, args in json.loads(sys.argv[1]):
    seen[name] = {"exit": run_cli(args), **loaded()}
print(json.dumps(seen))
"""


def imports_after(commands: dict[str, list[str]]) -> dict:
    """{command name: {exit, image, datasets}} after each command in turn, and {image, datasets} for "transformers"."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(commands.items()))],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_a_text_job_imports_no_image_module_of_its_own(tmp_path, tiny_models):
    job = write_job(tmp_path / "text", tiny_models.text_classifier, rows(3))
    seen = imports_after({"plan": ["plan", str(job), "--json"], "run": ["run", str(job), "--no-progress"]})
    baseline = seen["transformers"]["image"]
    assert not [m for m in baseline if m.startswith("torchvision") or "image_processing" in m]
    assert seen["plan"] == {"exit": 0, "image": baseline, "datasets": False}  # plan reads no data
    assert seen["run"] == {"exit": 0, "image": baseline, "datasets": True}


def test_an_image_job_still_loads_its_image_processor(tmp_path, tiny_models):
    image = write_manifest(tmp_path / "image.yaml", manifest(tiny_models.image_classifier, task="image-classification"))
    seen = imports_after({"plan": ["plan", str(image), "--json"]})
    assert seen["plan"]["exit"] == 0
    assert "transformers.image_processing_base" in set(seen["plan"]["image"]) - set(seen["transformers"]["image"])
