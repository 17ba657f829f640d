"""A server engine's settings, resolved from the job: which API, the request fields the generation settings map onto,
the headers, and what of it is the run's identity (never the URL, the key or the headers).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass

from transformers import GenerationConfig

from pipeline_core.errors import BatchrunError, UsageError
from pipeline_core.manifest import Job

# generate() settings and the API field each one is sent as (top_k, min_tokens and repetition_penalty are the
# extensions vLLM, SGLang and transformers serve accept beside OpenAI's own fields)
API_FIELDS = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "temperature": "temperature",
              "top_p": "top_p", "top_k": "top_k", "repetition_penalty": "repetition_penalty", "stop_strings": "stop"}
# settings the server takes from the checkpoint itself, or that change nothing in an answer's text
SERVER_OWN = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "do_sample", "use_cache",
              "transformers_version", "_from_model_config", "max_length", "return_dict_in_generate",
              "output_scores", "output_logits", "output_attentions", "output_hidden_states", "num_return_sequences"}
SAMPLING_ONLY = ("temperature", "top_p", "top_k")


@dataclass
class EngineSettings:
    kind: str  # vllm, sglang or server
    api: str  # completions or chat
    url: str | None  # a running server's; None: batchrun starts one
    fields: dict  # added to every request: the generation settings as API fields, then model.engine.request
    command: list[str] | None  # a started server's, placeholders unfilled (engines/server.py); None for a URL

    @property
    def started(self) -> bool:
        return self.url is None


def engine_kind(job: Job) -> str:
    return job.get("model.engine.kind")


def is_served(job: Job) -> bool:
    return engine_kind(job) != "transformers"


def api_of(job: Job) -> str:
    return job.get("model.engine.api") or ("chat" if job.get("model.chat_template") else "completions")


def request_fields(job: Job, generation: GenerationConfig) -> dict:
    """The merged generation settings (the checkpoint's, the task's defaults, model.generation) as API fields; exit 2
    naming a setting the API cannot express. Greedy decoding is temperature 0."""
    settings, defaults = generation.to_dict(), GenerationConfig().to_dict()
    asked = job.get("model.generation") or {}
    for name, value in settings.items():
        if name in API_FIELDS or name in SERVER_OWN or (value == defaults.get(name) and name not in asked):
            continue
        where = (f"model.generation.{name}" if name in asked
                 else f"the checkpoint's generation settings ({name}={value!r})")
        raise UsageError(f"{where}: the OpenAI-compatible API of model.engine.kind {engine_kind(job)} has no field "
                         f"for it (it sends {', '.join(sorted(API_FIELDS))}); remove it, or run the job with "
                         "model.engine.kind: transformers")
    if settings.get("max_new_tokens") is None:
        raise UsageError("model.generation.max_new_tokens is needed with a server engine: the API counts new tokens "
                         "(max_tokens), not the whole sequence (max_length)")
    fields = {API_FIELDS[name]: value for name, value in settings.items()
              if name in API_FIELDS and value is not None and (name in asked or value != defaults.get(name))}
    fields["max_tokens"] = settings["max_new_tokens"]
    if not settings.get("do_sample"):  # greedy, as generate() without do_sample
        for name in SAMPLING_ONLY:
            fields.pop(name, None)
        fields["temperature"] = 0
    return {**fields, **(job.get("model.engine.request") or {})}


def request_headers(job: Job) -> dict:
    """The headers of every request: model.engine.headers, and the API key as a bearer token."""
    headers = dict(job.get("model.engine.headers") or {})
    key = job.get("model.engine.api_key")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def served_models(url: str, headers: dict, timeout: float = 30, unreachable=BatchrunError) -> list[str]:
    """The ids GET /v1/models lists. A server that does not answer is `unreachable` (exit 1 for a run, which a
    scheduler retries: a shared server may be restarting; plan says exit 2)."""
    base = url.rstrip("/")
    address = (base if base.endswith("/v1") else base + "/v1") + "/models"
    try:
        with urllib.request.urlopen(urllib.request.Request(address, headers=headers), timeout=timeout) as answer:
            payload = json.load(answer)
    except urllib.error.HTTPError as error:
        failure = UsageError if error.code in (401, 403, 404) else unreachable
        raise failure(f"model.engine.url: {address} answered HTTP {error.code} ({error.reason})") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise unreachable(f"model.engine.url: no OpenAI-compatible server answers at {address} "
                          f"({getattr(error, 'reason', error)})") from None
    return [str(entry.get("id")) for entry in payload.get("data") or [] if isinstance(entry, dict)]


def served_model(job: Job, models: list[str], where: str) -> str:
    """The model id requests name: model.name when the server lists it, else the one model it serves; exit 2 when
    it serves others."""
    name = job.get("model.name")
    if name in models:
        return name
    if len(models) == 1:
        return models[0]
    raise UsageError(f"model.name {name!r} is not among the models {where} serves ({', '.join(models) or 'none'}); "
                     "set model.name to one of them")
