"""Read a job manifest: YAML (safely), then `--set` overrides, then `${VAR}` from the environment.

Each step reports problems instead of raising, so a user sees every mistake of a job in one go;
`pipeline_core.manifest.load_job` turns the collected list into one ManifestError.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pipeline_core.manifest.spec import SECTIONS, find_key, show
from pipeline_core.manifest.suggest import unknown_key_problem


class _JobLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: PyYAML would silently keep the last one."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {show(key)} (the first one would be silently ignored)", mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> tuple[Any, list[str]]:
    """The parsed document, or None and the problem (missing file, bad encoding, bad syntax at line L)."""
    if not path.exists():
        return None, [f"job file not found (looked for {path.resolve()})"]
    if path.is_dir():
        return None, ["is a directory, not a job file"]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        return None, [f"is not UTF-8 text (byte {error.start})"]
    except OSError as error:
        return None, [f"cannot be read: {error.strerror}"]
    try:
        return yaml.load(text, Loader=_JobLoader), []
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        return None, [f"{where}invalid YAML: {error.problem or error.context}"]
    except yaml.YAMLError as error:
        return None, [f"invalid YAML: {error}"]


def apply_overrides(job: dict, overrides: list[str]) -> list[str]:
    """Apply `--set a.b.c=VALUE` in order, VALUE parsed as YAML; returns the problems."""
    problems = []
    for override in overrides:
        path, sep, raw = override.partition("=")
        path = path.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)*", path):
            problems.append(f"--set {show(override)} is not KEY=VALUE with a dotted key (batching.max_tokens=8192)")
            continue
        if path not in SECTIONS and find_key(path) is None:
            problems.append("--set " + unknown_key_problem(path))
            continue
        key = find_key(path)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            if not (key and key.type.is_text()):
                problems.append(f"--set {path}: {show(raw)} is not a valid YAML value ({error.__class__.__name__})")
                continue
            value = raw
        # `--set model.prompt=Summarize: {text}` means the text, not the YAML mapping it parses to.
        if key and key.path == path and key.type.is_text() and not key.type.accepts(value) and key.type.accepts(raw):
            value = raw
        problem = _set_path(job, path.split("."), value)
        if problem:
            problems.append(f"--set {path}: {problem}")
    return problems


def _set_path(job: dict, parts: list[str], value: Any) -> str | None:
    node = job
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if child is None:  # `generation:` left empty in YAML reads as null
            child = node[part] = {}
        if not isinstance(child, dict):
            return f"{'.'.join(parts[:depth + 1])} is {show(child)}, not a mapping, so it has no key {parts[depth + 1]}"
        node = child
    node[parts[-1]] = value
    return None


_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{[^}]*\}?")


def interpolate(job: Any, environ: dict, path: str = "") -> tuple[Any, list[str]]:
    """Replace `${VAR}` and `${VAR:-default}` in every string value; `$$` is a literal `$`.

    A value that is a single reference, on a key that does not take the text as it is (`max_tokens: ${TOKENS}`),
    is parsed as a YAML scalar so that templated numbers and booleans keep their type.
    """
    if isinstance(job, dict):
        problems, result = [], {}
        for key, value in job.items():
            result[key], found = interpolate(value, environ, f"{path}.{key}" if path else str(key))
            problems += found
        return result, problems
    if isinstance(job, list):
        problems, result = [], []
        for index, value in enumerate(job):
            item, found = interpolate(value, environ, f"{path}[{index}]")
            result.append(item)
            problems += found
        return result, problems
    if isinstance(job, str) and "$" in job:
        return _substitute(job, environ, path)
    return job, []


def _substitute(text: str, environ: dict, path: str) -> tuple[Any, list[str]]:
    problems = []

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name is None:
            problems.append(
                f"{path}: {show(match.group(0))} is not a valid reference; use ${{VAR}} or ${{VAR:-default}}"
            )
            return ""
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        problems.append(
            f"{path} uses ${{{name}}}, but the environment variable {name} is not set "
            f"(set it, or give a default: ${{{name}:-value}})"
        )
        return ""

    result = _REFERENCE.sub(replace, text)
    whole = _REFERENCE.fullmatch(text)
    key = find_key(path.split("[")[0])
    # `max_tokens: ${TOKENS}` must give a number: where the key does not take the text, read it as YAML
    if not problems and whole and whole.group(1) and key is not None and not key.type.accepts(result):
        try:
            parsed = yaml.safe_load(result)
        except yaml.YAMLError:
            parsed = result
        if parsed is None or isinstance(parsed, (bool, int, float, str)):
            return parsed, problems
    return result, problems
