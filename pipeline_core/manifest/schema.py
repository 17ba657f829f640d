"""The manifest's JSON Schema and the docs' key reference (docs/manifest.md), both generated from the key table.

Regenerate after changing `spec.KEYS` (a test fails while either is stale):

    python -m pipeline_core.manifest.schema > manifests/job.schema.json
    python -m pipeline_core.manifest.schema --markdown   # paste over the table in docs/manifest.md
"""

from __future__ import annotations

import json
import sys

from pipeline_core.manifest.spec import DERIVED, KEYS

# `max_tokens: ${TOKENS}` is valid before interpolation; editors should not flag it.
ENV_REFERENCE = {"type": "string", "pattern": r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}$"}


def job_schema() -> dict:
    root = _object("batchrun job manifest", "A batch inference job: see README.md and manifests/job.schema.json.")
    for key in KEYS:
        *sections, leaf = key.path.split(".")
        node = root
        for section in sections:
            node = node["properties"].setdefault(section, _object(section, f"{section} settings"))
        node["properties"][leaf] = _property(key)
        if key.required:
            node["required"].append(leaf)
            # a section holding a required key is required too
            if sections and sections[0] not in root["required"]:
                root["required"].append(sections[0])
    return root


def _object(title: str, description: str) -> dict:
    return {"title": title, "description": description, "type": "object",
            "additionalProperties": False, "properties": {}, "required": []}


def _property(key) -> dict:
    schema = key.type.schema()
    if not key.type.accepts("${VAR}"):
        schema = {"anyOf": [schema, ENV_REFERENCE]}
    schema["description"] = key.help
    if not key.required and key.default is not DERIVED:
        schema["default"] = key.default
    return schema


def render_schema() -> str:
    return json.dumps({"$schema": "https://json-schema.org/draft/2020-12/schema", **job_schema()}, indent=2) + "\n"


def render_key_table() -> str:
    """The manifest reference of docs/manifest.md: one row per key."""
    rows = ["| key | allowed | default | what it does |", "|---|---|---|---|"]
    for key in KEYS:
        if key.required:
            default = "**required**"
        elif key.default is DERIVED:
            default = "derived"
        else:
            default = f"`{json.dumps(key.default)}`"
        allowed, help_text = (text.replace("|", "\\|") for text in (key.type.description, key.help))
        rows.append(f"| `{key.path}` | {allowed} | {default} | {help_text} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_key_table() if "--markdown" in sys.argv[1:] else render_schema())
