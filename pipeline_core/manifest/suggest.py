"""'did you mean ...?' for unknown manifest keys and other names a user writes."""

from __future__ import annotations

import difflib

from pipeline_core.manifest.spec import KEYS, SECTIONS


def closest_key(path: str) -> str | None:
    """The known key a user most likely meant by `path`, or None when nothing is close."""
    known = [key.path for key in KEYS] + list(SECTIONS)
    leaf = path.split(".")[-1]
    # A right name in the wrong section (model.max_tokens) is the likeliest mistake of all.
    moved = [candidate for candidate in known if candidate.split(".")[-1] == leaf and candidate != path]
    if len(moved) == 1:
        return moved[0]
    close = difflib.get_close_matches(path, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    close = difflib.get_close_matches(leaf, [candidate.split(".")[-1] for candidate in known], n=1, cutoff=0.75)
    if close:
        return next(candidate for candidate in known if candidate.split(".")[-1] == close[0])
    return None


def closest(name: str, known: list[str]) -> str | None:
    """The known name closest to a misspelt one (an option, a metric), or None when nothing is close."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_key_problem(path: str) -> str:
    suggestion = closest_key(path)
    hint = f"; did you mean {suggestion}?" if suggestion else "; see manifests/job.schema.json for every key"
    return f"{path}: unknown key{hint}"
