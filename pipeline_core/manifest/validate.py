"""Check a parsed job against the key table, collecting every problem, then fill in defaults.

Each problem names the dotted key, the bad value and what is allowed:
"batching.max_tokens must be a positive integer, got -5".
"""

from __future__ import annotations

import copy
import difflib
import string
from typing import Any

from pipeline_core.manifest.spec import (
    DERIVED,
    KEYS,
    KEYS_BY_PATH,
    METRICS,
    RESERVED_COLUMNS,
    SECTIONS,
    TASK_COLUMNS,
    reference_output_column,
    show,
)
from pipeline_core.manifest.suggest import unknown_key_problem


def check_job(job: Any) -> list[str]:
    """Every problem of a parsed manifest; an empty list means it is valid."""
    if job is None:
        return ["is empty; a job needs at least task, model.name and dataset.path"]
    if not isinstance(job, dict):
        return [f"must be a mapping of keys (task: ..., model: ...), got {type(job).__name__} {show(job)}"]
    problems = _check_known_keys(job, "")
    for key in KEYS:
        present, value = lookup(job, key.path)
        if not present:
            if key.required:
                problems.append(f"{key.path} is required: {key.help[0].lower()}{key.help[1:]}")
        elif not key.type.accepts(value):
            suggestion = key.type.suggest(value)
            hint = f"; did you mean {suggestion}?" if suggestion else ""
            problems.append(f"{key.path} must be {key.type.description}, got {show(value)}{hint}")
    if not problems:  # cross-key checks assume each value has its type
        problems += _check_together(job)
    return problems


def lookup(job: dict, path: str) -> tuple[bool, Any]:
    node: Any = job
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _check_known_keys(node: dict, prefix: str) -> list[str]:
    problems = []
    for name, value in node.items():
        path = f"{prefix}{name}"
        if not isinstance(name, str):
            problems.append(f"{prefix or 'the top level'}: keys must be strings, got {show(name)}")
        elif path in KEYS_BY_PATH:
            continue
        elif path in SECTIONS:
            if isinstance(value, dict):
                problems += _check_known_keys(value, path + ".")
            else:
                problems.append(f"{path} must be a mapping of settings ({path}: {{...}}), got {show(value)}")
        else:
            problems.append(unknown_key_problem(path))
    return problems


def _check_together(job: dict) -> list[str]:
    """Rules that involve more than one key, or more than a key's type."""
    problems = []
    task = job["task"]
    _, keep = lookup(job, "dataset.keep_columns")
    taken = set(RESERVED_COLUMNS) | set(TASK_COLUMNS[task])
    for column in keep or []:
        if column in taken:
            problems.append(
                f"dataset.keep_columns holds {show(column)}, which the {task} output already has "
                f"(output columns: {', '.join(sorted(taken))}); drop it or rename it upstream"
            )
    duplicates = sorted({column for column in keep or [] if keep.count(column) > 1})
    if duplicates:
        problems.append(f"dataset.keep_columns lists {', '.join(duplicates)} more than once")
    problems += _check_evaluate(job)
    _, prompt = lookup(job, "model.prompt")
    if prompt is not None:
        problems += _check_prompt(prompt)
    _, generation = lookup(job, "model.generation")
    if generation:
        problems += _check_generation(generation)
    problems += _check_engine(job)
    _, options = lookup(job, "dataset.options")
    if options:
        from pipeline_core.manifest.options import option_problems  # deferred: imports datasets

        problems += option_problems(options, job["dataset"]["path"])
    return problems


def _check_evaluate(job: dict) -> list[str]:
    """evaluate: metrics that exist and fit the task, and a name in the output for the reference column."""
    task = job["task"]
    _, reference = lookup(job, "evaluate.reference_column")
    _, metrics = lookup(job, "evaluate.metrics")
    fitting = METRICS.get(task, ())
    if reference is None:
        if metrics is not None:
            return ["evaluate.metrics needs evaluate.reference_column, the dataset column holding each row's "
                    "expected output"]
        return []
    if not fitting:
        return [f"evaluate: the {task} task has no metrics; evaluation fits "
                f"{', '.join(name for name in METRICS)}"]
    problems = []
    carried = reference_output_column(task, reference)
    _, keep = lookup(job, "dataset.keep_columns")
    if carried != reference and carried in (keep or []):
        problems.append(f"evaluate.reference_column {show(reference)} is carried into the output as {carried} "
                        f"(the {task} output has its own {reference}), which dataset.keep_columns also holds; "
                        f"drop {carried} from dataset.keep_columns")
    if metrics is not None and not metrics:
        problems.append(f"evaluate.metrics is empty; list at least one of {', '.join(fitting)} (or leave it out "
                        "for all of them)")
    known = sorted({name for names in METRICS.values() for name in names})
    for name in metrics or []:
        if name not in known:
            close = difflib.get_close_matches(name, fitting, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            problems.append(f"evaluate.metrics: unknown metric {show(name)}; {hint}metrics that fit {task}: "
                            f"{', '.join(fitting)}")
        elif name not in fitting:
            problems.append(f"evaluate.metrics: {name} does not fit {task}; metrics that fit it: "
                            f"{', '.join(fitting)}")
    duplicates = sorted({name for name in metrics or [] if metrics.count(name) > 1})
    if duplicates:
        problems.append(f"evaluate.metrics lists {', '.join(duplicates)} more than once")
    return problems


def _check_prompt(prompt: str) -> list[str]:
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(prompt) if field is not None]
    except ValueError as error:
        return [f"model.prompt is not a valid template ({error}); write columns as {{text}} and braces as {{{{ }}}}"]
    if any(field == "" or field.isdigit() for field in fields):
        return [f"model.prompt must name its columns ({{text}}), not use positional fields: {show(prompt)}"]
    if not fields:
        return [f"model.prompt must use at least one column, such as {{text}}; got {show(prompt)}"]
    return []


def _check_engine(job: dict) -> list[str]:
    """model.engine: a server engine generates text (text-generation, summarization), and `server` is given exactly
    one of a command to start or the URL of a running server."""
    _, kind = lookup(job, "model.engine.kind")
    _, command = lookup(job, "model.engine.command")
    _, url = lookup(job, "model.engine.url")
    kind = kind or "transformers"
    if kind == "transformers":
        given = [name for name, value in (("command", command), ("url", url)) if value is not None]
        return [f"model.engine.{name} is set, but model.engine.kind is transformers (the model in this process); set "
                "model.engine.kind: server to use it" for name in given]
    problems = []
    if job["task"] not in ("text-generation", "summarization"):
        problems.append(f"model.engine.kind {kind} serves text-generation and summarization; task {job['task']} runs "
                        "in this process: set model.engine.kind: transformers (the default)")
    if kind == "server" and (command is None) == (url is None):
        problems.append("model.engine.kind server needs one of model.engine.command (a command that starts an "
                        "OpenAI-compatible server) or model.engine.url (a running one), not "
                        + ("both" if command is not None else "neither"))
    if kind in ("vllm", "sglang") and (command is not None or url is not None):
        problems.append(f"model.engine.kind {kind} starts its own server; for another command or a running server "
                        "use model.engine.kind: server with model.engine.command or model.engine.url")
    if command is not None and not command:
        problems.append("model.engine.command is empty; give the command and its arguments as a list")
    if url is not None and not str(url).startswith(("http://", "https://")):
        problems.append(f"model.engine.url must start with http:// or https://, got {show(url)}")
    return problems


def _check_generation(generation: dict) -> list[str]:
    """Names in model.generation must be generate() settings: a typo would otherwise be ignored or crash late.

    Values are checked by the initializer, once merged with the model's own settings.
    """
    from transformers import GenerationConfig  # deferred: only jobs that set generation pay for the import

    known = sorted(set(GenerationConfig().to_dict()) - {"_from_model_config", "transformers_version"})
    problems = []
    for name in generation:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean model.generation.{close[0]}?" if close else ""
            problems.append(f"model.generation.{name}: not a generate() setting{hint}")
    return problems


def fill_defaults(job: dict, stem: str) -> dict:
    """A full job in the key table's order, defaults filled and derived ones (name, output.path) computed."""
    full: dict = {}
    for key in KEYS:
        present, value = lookup(job, key.path)
        # `generation:` left empty reads as null; it means "none", i.e. the empty default.
        if not present or (value is None and isinstance(key.default, (dict, list))):
            value = None if key.default is DERIVED else key.default
        *sections, leaf = key.path.split(".")
        node = full
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = copy.deepcopy(value)
    full["name"] = full["name"] or stem
    full["output"]["path"] = full["output"]["path"] or f"outputs/{full['name']}"
    return full
