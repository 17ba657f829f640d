"""Generation on a server: the task that turns rows into requests, the runner that keeps them in flight, and the
engine that checks, starts and stops the server.

The control plane does not change: parts are still claimed, computed and committed whole by work.py. What changes
is how a slice is computed: its rows go to the server as concurrent requests (ServerClient), and the runner hands
work.py a slice's answers once all are in. `ahead` lets work.py submit the next slice before waiting for the
current one, so the server's queue never runs dry at a part boundary.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import pyarrow as pa
import torch

from pipeline_core.data.loader import BatchLimits
from pipeline_core.engines.client import ClientSettings, ServerClient
from pipeline_core.engines.server import ServerProcess, check_executable, server_command
from pipeline_core.engines.settings import (
    EngineSettings,
    api_of,
    engine_kind,
    request_fields,
    request_headers,
    served_model,
    served_models,
)
from pipeline_core.errors import BatchrunError, UsageError
from pipeline_core.execute import Interrupted
from pipeline_core.initializer.components import load_config, load_tokenizer, model_input_limit
from pipeline_core.initializer.generation import preview_generation_config
from pipeline_core.initializer.preview import ModelPreview, check_chat_template, check_max_length
from pipeline_core.manifest import Job
from pipeline_core.tasks.text import Encoded, TextEncoder

log = logging.getLogger("batchrun")
STOP_WAIT_SECONDS = 10.0
UNBATCHED = BatchLimits(max_tokens=2**62, max_batch_size=2**31, pad_multiple=1)  # a slice is one batch of requests


# ---- before OUTPUT: what can be checked, and the identity -------------------------------------------------------

def preview_served(job: Job) -> ModelPreview:
    """The checkpoint's config and tokenizer where they can be read, checked against the engine: exit 2 for a
    seq2seq model, a chat template batchrun must render but the tokenizer lacks, or a server program not installed.
    A URL's model may exist only on the server: then there is no config, and prompts are not truncated here."""
    kind, url = engine_kind(job), job.get("model.engine.url")
    try:
        config = load_config(job)
    except BatchrunError:  # not a local directory, not in the cache, the hub not reachable
        if url is None:
            raise
        config = None
        log.info("%r is not a local or cached checkpoint: prompts go to the server untruncated",
                 job.get("model.name"))
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise UsageError(f"{job.get('model.name')!r} is a sequence-to-sequence model ({config.model_type}); "
                         f"model.engine.kind {kind} serves causal (decoder-only) models: run it with "
                         "model.engine.kind: transformers")
    tokenizer = load_tokenizer(job) if config is not None else None
    renders_template = job.get("model.chat_template") and api_of(job) == "completions"
    if renders_template:  # the completions API takes the templated text: batchrun renders it
        if tokenizer is None:
            raise UsageError("model.engine.api completions with model.chat_template: true needs the model's tokenizer "
                             "here to render the template; use model.engine.api: chat, where the server renders it")
        check_chat_template(job, tokenizer)
    if tokenizer is not None:
        check_max_length(job, tokenizer, config)
    if url is None:
        check_executable(kind, server_command(kind, job.get("model.engine.command"), job.get("model.engine.args")))
    return ModelPreview(config, tokenizer)


def engine_settings(job: Job, config) -> EngineSettings:
    generation = preview_generation_config(job, config) if config is not None else _task_defaults(job)
    url = job.get("model.engine.url")
    command = None if url else server_command(engine_kind(job), job.get("model.engine.command"),
                                              job.get("model.engine.args"))
    return EngineSettings(engine_kind(job), api_of(job), url, request_fields(job, generation), command)


def served_identity(job: Job, preview: ModelPreview) -> dict:
    """What of the engine changes answers: its kind, the API, the request fields, the command a started server runs
    (its placeholders unfilled) or the model a running server reports. Not the URL, the key or the headers."""
    settings = engine_settings(job, preview.config)
    values = {"kind": settings.kind, "api": settings.api, "request": settings.fields}
    if settings.started:
        values["command"] = settings.command
    else:
        values["served_model"] = served_model(job, served_models(settings.url, request_headers(job)), settings.url)
    return values


def plan_served(job: Job) -> dict:
    """`plan` for a server engine, without starting or loading anything: the engine, the command it would start (its
    program checked) or the URL (checked to answer and serve the model), the request fields."""
    stages, started = [], time.perf_counter()
    preview = preview_served(job)
    stages.append(("preview", time.perf_counter() - started))
    engine = ServedEngine(job, preview, server_device(job, None), stop=None)
    if not engine.settings.started:
        started = time.perf_counter()
        url = engine.settings.url
        engine.model_id = served_model(job, served_models(url, request_headers(job), unreachable=UsageError), url)
        stages.append(("server check", time.perf_counter() - started))
    engine.stages = stages
    summary = engine.summary()
    summary["engine"]["url"] = _without_credentials(engine.settings.url)
    return summary


def _without_credentials(url: str | None) -> str | None:
    """The URL as plan shows it: a user:password@ in it is hidden."""
    if url is None or "@" not in url.split("//", 1)[-1].split("/", 1)[0]:
        return url
    scheme, rest = url.split("//", 1)
    return f"{scheme}//***@{rest.split('@', 1)[1]}"


def _task_defaults(job: Job):
    from transformers import GenerationConfig

    from pipeline_core.initializer.generation import merge_generation_config

    return merge_generation_config(GenerationConfig(), None, job.get("task"), job.get("model.generation"))[0]


# ---- the task: rows -> request texts ----------------------------------------------------------------------------

class ServedGenerationTask:
    """Rows -> the text each row sends (prompt filled in, shortened to the model's limit when the tokenizer is
    here), and answers -> the generated_text / summary_text column."""

    slice_rows = None

    def __init__(self, job: Job, preview: ModelPreview, settings: EngineSettings):
        self.column = "summary_text" if job.get("task") == "summarization" else "generated_text"
        self.columns = {self.column: pa.string()}
        self.api = settings.api
        tokenizer = preview.tokenizer
        self.encoder = TextEncoder(
            tokenizer, job.get("dataset.input_column"),
            max_length=_max_length(job, preview, settings) if tokenizer is not None else None,
            prompt=job.get("model.prompt"), chat_template=job.get("model.chat_template"),
            keep_template=True, sends_text=True)
        self.render = self.encoder.chat_template and self.api == "completions"

    def encode(self, table: pa.Table) -> Encoded:
        if self.encoder.tokenizer is not None:
            return self.encoder(table)
        texts, errors = self.encoder.texts(table)  # no tokenizer here: nothing is shortened
        return Encoded([None if error else [] for error in errors], errors, texts=texts)

    def collate(self, encoding: Encoded, rows: list[int]) -> dict:
        return {}  # nothing to pad: each row is a request of its own

    def body(self, text: str) -> dict:
        """A row's request, before the model and the generation fields are added."""
        if self.api == "chat":
            return {"messages": [{"role": "user", "content": text}]}
        return {"prompt": self.encoder.templated(text) if self.render else text}

    def value(self, text: str) -> str:
        return text.strip() if self.column == "summary_text" else text


def _max_length(job: Job, preview: ModelPreview, settings: EngineSettings) -> int | None:
    """batching.max_length, else the model's limit less the new tokens (the prompt and the answer share it)."""
    if job.get("batching.max_length") is not None:
        return job.get("batching.max_length")
    limit = model_input_limit(preview.tokenizer, preview.config)
    return max(limit - settings.fields["max_tokens"], 1) if limit else None


# ---- the runner: a slice's rows in flight, answers back in row order ---------------------------------------------

@dataclass
class RequestFigures:
    """A slice's requests, as a part's metrics record them."""

    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latencies: list = field(default_factory=list)  # seconds from send to answer, per request


@dataclass
class Submitted:
    part: object
    rows: list[int]
    answers: Future
    started: float

    def done(self) -> bool:
        return self.answers.done()


class ServedRunner:
    """work.py's runner for a server: `submit` sends a slice's rows and returns at once; `result` waits for them."""

    ahead = 1  # slices submitted beyond the one being waited on: the server's queue stays full across parts

    def __init__(self, task: ServedGenerationTask, client: ServerClient, fields: dict, stop, on_batch):
        self.task, self.client, self.fields, self.stop = task, client, fields, stop
        self.on_batch = on_batch
        self.device = torch.device("cpu")  # this process only prepares and decodes text
        self.measured: list[tuple[float, float, int, int, int]] = []
        self.figures = RequestFigures()

    def submit(self, part) -> Submitted:
        rows = [row for row, error in enumerate(part.encoded.errors) if error is None]
        bodies = [{**self.fields, **self.task.body(part.encoded.texts[row])} for row in rows]
        return Submitted(part, rows, self.client.submit(bodies), time.perf_counter())

    def result(self, submitted: Submitted) -> list[tuple[list[int], dict]]:
        answers = self._wait(submitted.answers)
        if any(answer.stopped for answer in answers):
            raise Interrupted
        part, ok, texts = submitted.part, [], []
        for row, answer in zip(submitted.rows, answers, strict=True):
            if answer.error is not None:
                part.encoded.errors[row] = answer.error
                log.warning("row %d failed: %s", part.first_row + row, answer.error[:200],
                            extra={"event": "row_failed", "row": part.first_row + row, "part": part.index})
            else:
                ok.append(row)
                texts.append(self.task.value(answer.text))
        self._measure(submitted, answers)
        return [(ok, {self.task.column: texts})] if ok else []

    def _wait(self, answers: Future) -> list:
        """The slice's answers. After a stop, nothing more is sent, and the requests in flight have
        STOP_WAIT_SECONDS to come back (a scheduler's grace period is short); past that the slice is dropped."""
        stopped = None
        while True:
            try:
                return answers.result(timeout=0.2)
            except FutureTimeout:
                if not self.stop.requested:
                    continue
                stopped = stopped or time.monotonic()
                if time.monotonic() - stopped > STOP_WAIT_SECONDS:
                    answers.cancel()
                    raise Interrupted from None

    def _measure(self, submitted: Submitted, answers: list) -> None:
        figures = self.figures
        figures.requests += len(answers)
        figures.retries += sum(answer.retries for answer in answers)
        prompt = sum(answer.prompt_tokens for answer in answers)
        figures.prompt_tokens += prompt
        figures.completion_tokens += sum(answer.completion_tokens for answer in answers)
        figures.latencies += [answer.seconds for answer in answers]
        self.measured.append((time.time(), time.perf_counter() - submitted.started, len(answers), prompt, prompt))
        self.on_batch(len(answers), prompt)

    def take_measured(self) -> list[tuple[float, float, int, int, int]]:
        measured, self.measured = self.measured, []
        return measured

    def take_requests(self) -> RequestFigures:
        figures, self.figures = self.figures, RequestFigures()
        return figures


# ---- the engine: started (or reached), and stopped -------------------------------------------------------------

class ServedEngine:
    """A server for the run: started under its guard (or reached at its URL), its served model id, the client."""

    def __init__(self, job: Job, preview: ModelPreview, device: tuple[str, bool], stop):
        self.job, self.preview, self.stop = job, preview, stop
        self.settings = engine_settings(job, preview.config)
        self.server_device, self.pinned = device
        # where the answers are computed, as the summary line and the metrics name it
        self.device = self.server_device if self.settings.started else "server"
        self.server: ServerProcess | None = None
        self.client: ServerClient | None = None
        self.model_id: str | None = None
        self.stages: list[tuple[str, float]] = []

    def open(self) -> ServedEngine:
        job, settings, started = self.job, self.settings, time.perf_counter()
        headers = request_headers(job)
        if settings.started:
            self.server = ServerProcess(settings.command, job.get("model.name"), self.server_device,
                                        job.get("model.engine.startup_timeout"), job.get("model.engine.restarts"),
                                        _visible_devices(settings.kind, self.server_device, self.pinned))
            self.server.start(lambda: self.stop.requested)
            if self.stop.requested:
                return self
            self.stages.append(("server start", time.perf_counter() - started))
        url = self.server.url if self.server is not None else settings.url
        self.model_id = served_model(job, served_models(url, headers), url)
        self.client = ServerClient(
            ClientSettings(url, settings.api, job.get("model.engine.max_concurrency"),
                           job.get("model.engine.request_timeout"), job.get("model.engine.retries"), headers),
            self.server, should_stop=lambda: self.stop.requested)
        return self

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.stop()

    @property
    def dtype(self) -> None:
        return None  # the server's own

    def task(self) -> ServedGenerationTask:
        return ServedGenerationTask(self.job, self.preview, self.settings)

    def runner(self, task: ServedGenerationTask, on_batch) -> tuple[BatchLimits, ServedRunner]:
        fields = {"model": self.model_id, **self.settings.fields}
        return UNBATCHED, ServedRunner(task, self.client, fields, self.stop, on_batch)

    def label_names(self) -> None:
        return None

    def summary(self) -> dict:
        """plan's and _batchrun.json's account of the run: the engine, the request fields, the stages (plan adds
        the URL, without credentials)."""
        job, settings = self.job, self.settings
        tokenizer = self.preview.tokenizer
        return {"task": job.get("task"), "model_class": None,
                "tokenizer_class": type(tokenizer).__name__ if tokenizer is not None else None,
                "processor_class": None, "device": self.device,
                "dtype": None, "hf_device_map": None, "generation_config": settings.fields, "input_prefix": None,
                "embedding": None,
                "engine": {"kind": settings.kind, "api": settings.api, "served_model": self.model_id,
                           "command": settings.command},
                "stages": [{"name": name, "seconds": round(seconds, 4)} for name, seconds in self.stages]}


def _visible_devices(kind: str, device: str, pinned: bool) -> dict | None:
    """vLLM and SGLang take the GPUs they see. A server pinned to cuda:N (by model.device, or as a launched rank's
    own GPU) sees GPU N alone; otherwise it sees every GPU, so that --tensor-parallel-size can span them."""
    if pinned and kind in ("vllm", "sglang") and device.startswith("cuda:"):
        return {"CUDA_VISIBLE_DEVICES": device.split(":", 1)[1]}
    return None


def server_device(job: Job, local_rank: int | None) -> tuple[str, bool]:
    """The device a started server runs on, and whether it is pinned to it: model.device, or under a launcher the
    rank's local GPU; else the first GPU, unpinned."""
    requested = job.get("model.device")
    if isinstance(requested, int):
        return ("cpu" if requested < 0 else f"cuda:{requested}"), requested >= 0
    if requested != "auto":
        return requested, ":" in requested
    if torch.cuda.is_available():
        return f"cuda:{(local_rank or 0) % torch.cuda.device_count()}", local_rank is not None
    return "cpu", False
