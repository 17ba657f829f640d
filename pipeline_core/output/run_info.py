"""`_batchrun.json` read back: whose run OUTPUT holds. One that is not JSON, or lacks what a run or status needs,
is a usage error (exit 2) naming the file: OUTPUT holds something that is not a batchrun run, and no retry helps.
"""

from __future__ import annotations

import json

from pipeline_core.errors import UsageError
from pipeline_core.output import RUN_INFO

ADVICE = "it is not a batchrun run directory, or it was edited; check the path (rerun the job with --fresh to start " \
         "it over)"


def read_run_info(store) -> dict:
    """OUTPUT's _batchrun.json ({} when there is none), with the identity every reader needs; a usage error naming
    the file when it is not a run's record."""
    raw = store.get(RUN_INFO)
    if raw is None:
        return {}
    info = parse_run_info(raw, store)
    if "identity" not in info:
        raise not_a_run(store, 'has no "identity" object')
    return info


def parse_run_info(raw: bytes, store) -> dict:
    """The run info of `store` from its bytes: a JSON object, whose identity, where it has one, is an object too."""
    try:
        info = json.loads(raw)
    except UnicodeDecodeError:
        raise not_a_run(store, "is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise not_a_run(store, f"is not valid JSON (line {error.lineno} column {error.colno})") from None
    if not isinstance(info, dict):
        raise not_a_run(store, f"holds {json.dumps(info)[:40]}, not a JSON object")
    if not isinstance(info.get("identity", {}), dict):
        raise not_a_run(store, 'has an "identity" that is not an object')
    return info


def not_a_run(store, problem: str) -> UsageError:
    return UsageError(f"{store}/{RUN_INFO} {problem}: {ADVICE}")
