"""Every key of the job manifest, in one table: type, default, allowed values and a line of help.

Validation, default filling, `manifests/job.schema.json` and the docs' key reference are all
derived from `KEYS`; a new key is one new row here and nothing else.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from typing import Any

TASKS = (
    "summarization",
    "text-generation",
    "text-classification",
    "token-classification",
    "feature-extraction",
    "image-classification",
)

# Columns each task writes; a kept column may not shadow them (nor row_id / error).
TASK_COLUMNS = {
    "summarization": ("summary_text",),
    "text-generation": ("generated_text",),
    "text-classification": ("label", "score"),
    "token-classification": ("entities",),
    "feature-extraction": ("embedding",),
    "image-classification": ("label", "score"),
}
RESERVED_COLUMNS = ("row_id", "error")
# Metrics each task can be scored by against evaluate.reference_column (pipeline_core/evaluation.py).
METRICS = {
    "text-classification": ("accuracy", "macro_f1"),
    "summarization": ("rouge1", "rouge2", "rougeL", "exact_match"),
    "text-generation": ("rouge1", "rouge2", "rougeL", "exact_match"),
}


def reference_output_column(task: str, column: str) -> str:
    """The output's name for evaluate.reference_column: its own, or reference_<name> where the task's output already
    has that name (most classification datasets call their reference `label`, which is also the prediction's)."""
    return f"reference_{column}" if column in (*TASK_COLUMNS[task], *RESERVED_COLUMNS) else column


# sentence-transformers' pooling modes (initializer/embedding.py reads them from checkpoints)
POOLING = ("mean", "cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# model.engine.kind: this process, or a server that speaks the OpenAI API (pipeline_core/engines/)
ENGINES = ("transformers", "vllm", "sglang", "server")
SERVER_ENGINES = ENGINES[1:]


def show(value: Any) -> str:
    """A bad value as the user wrote it, short enough for one line of an error message."""
    text = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Type:
    """One kind of value: says whether a value fits, how to describe it, and its JSON Schema."""

    description = "a value"

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def schema(self) -> dict:
        raise NotImplementedError

    def is_text(self) -> bool:
        """Whether a string is a valid value (then `${VAR}` results stay strings)."""
        return False

    def suggest(self, value: Any) -> str | None:
        """The allowed value closest to a wrong one, for 'did you mean'."""
        return None


class Null(Type):
    description = "null"

    def accepts(self, value):
        return value is None

    def schema(self):
        return {"type": "null"}


class Text(Type):
    def __init__(self, pattern: str | None = None, description: str = "a non-empty string"):
        self.pattern = pattern
        self.description = description

    def accepts(self, value):
        if not isinstance(value, str) or not value.strip():
            return False
        return self.pattern is None or re.fullmatch(self.pattern, value) is not None

    def schema(self):
        return {"type": "string", "minLength": 1, **({"pattern": f"^(?:{self.pattern})$"} if self.pattern else {})}

    def is_text(self):
        return True


class Integer(Type):
    def __init__(self, minimum: int | None = None):
        self.minimum = minimum
        self.description = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, f"an integer >= {minimum}"
        )

    def accepts(self, value):
        # bool is an int subclass; `max_tokens: yes` is a mistake, not 1.
        if not isinstance(value, int) or isinstance(value, bool):
            return False
        return self.minimum is None or value >= self.minimum

    def schema(self):
        return {"type": "integer", **({"minimum": self.minimum} if self.minimum is not None else {})}


class Number(Type):
    def __init__(self, minimum: float, maximum: float):
        self.minimum, self.maximum = minimum, maximum
        self.description = f"a number from {minimum:g} to {maximum:g}"

    def accepts(self, value):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        return self.minimum <= value <= self.maximum

    def schema(self):
        return {"type": "number", "minimum": self.minimum, "maximum": self.maximum}


class Flag(Type):
    description = "true or false"

    def accepts(self, value):
        return isinstance(value, bool)

    def schema(self):
        return {"type": "boolean"}


class Choice(Type):
    def __init__(self, *values: str):
        self.values = values
        self.description = values[0] if len(values) == 1 else "one of " + ", ".join(values)

    def accepts(self, value):
        return isinstance(value, str) and value in self.values

    def schema(self):
        return {"enum": list(self.values)}

    def suggest(self, value):
        close = difflib.get_close_matches(str(value), self.values, n=1, cutoff=0.6)
        return close[0] if close else None

    def is_text(self):
        return True


class TextList(Type):
    description = "a list of strings"

    def accepts(self, value):
        return isinstance(value, list) and all(isinstance(item, str) for item in value)

    def schema(self):
        return {"type": "array", "items": {"type": "string"}}


class Mapping(Type):
    """An open mapping whose keys are the user's (generate() settings, a device map)."""

    def __init__(self, values: Type | None = None, description: str = "a mapping"):
        self.values = values
        self.description = description

    def accepts(self, value):
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            return False
        return self.values is None or all(self.values.accepts(item) for item in value.values())

    def schema(self):
        extra = self.values.schema() if self.values else {}
        return {"type": "object", "additionalProperties": extra or True}


class AnyOf(Type):
    def __init__(self, *types: Type):
        self.types = types
        self.description = " or ".join(t.description for t in types)

    def accepts(self, value):
        return any(t.accepts(value) for t in self.types)

    def schema(self):
        return {"anyOf": [t.schema() for t in self.types]}

    def is_text(self):
        return any(t.is_text() for t in self.types)

    def suggest(self, value):
        return next((found for t in self.types if (found := t.suggest(value))), None)


REQUIRED = object()  # default of a key the user must give
DERIVED = object()  # default computed from other keys at load time (see load.fill_defaults)


@dataclass(frozen=True)
class Key:
    path: str
    type: Type
    default: Any
    help: str
    # Keys below an open key are the user's own (model.generation.num_beams); --set may reach them.
    open: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


_ACCELERATORS = "cuda|mps|xpu|npu|hpu|mlu|musa"
DEVICE = AnyOf(
    Text(rf"auto|cpu|(?:{_ACCELERATORS})(?::\d+)?", "auto, cpu, an accelerator such as cuda or cuda:1"),
    Integer(minimum=-1),
)
DEVICE_MAP = AnyOf(
    Null(),
    Choice("auto", "balanced", "balanced_low_0", "sequential"),
    Mapping(AnyOf(Text(), Integer(minimum=0)), "a mapping of module name to device"),
)
DATA_FILES = AnyOf(
    Null(),
    Text(),
    TextList(),
    Mapping(AnyOf(Text(), TextList()), "a mapping of split name to files"),
)
SPLIT = Text(r"[\w.-]+(?:\[[^\]]*\])?(?:\+[\w.-]+(?:\[[^\]]*\])?)*", "a split name, optionally sliced: train[:1000]")
OPTIONAL_TEXT = AnyOf(Null(), Text())
STORAGE_OPTIONS = AnyOf(Null(), Mapping(description="a mapping of fsspec filesystem options"))

KEYS: tuple[Key, ...] = (
    Key("name", OPTIONAL_TEXT, DERIVED,
        "Job name, used in logs and the default output path; defaults to the file's stem."),
    Key("task", Choice(*TASKS), REQUIRED, "What to compute for each row."),
    # model
    Key("model.name", Text(), REQUIRED, "Hub id or local directory of the model."),
    Key("model.revision", OPTIONAL_TEXT, None, "Hub branch, tag or commit; null for the default branch."),
    Key("model.dtype", Choice("auto", "float32", "float16", "bfloat16"), "auto",
        "Weights' precision; auto keeps the checkpoint's."),
    Key("model.device", DEVICE, "auto", "auto, cpu, cuda, cuda:N, mps, xpu, npu, hpu, mlu, musa, -1 or an index N."),
    Key("model.device_map", DEVICE_MAP, None,
        "Let accelerate spread the model over devices: auto, balanced, sequential or {module: device}.", open=True),
    Key("model.trust_remote_code", Flag(), False, "Run model code shipped in the checkpoint's repository."),
    Key("model.generation", AnyOf(Null(), Mapping(description="a mapping of generate() settings")), {},
        "generate() settings, over the model's and the task's.", open=True),
    Key("model.prompt", OPTIONAL_TEXT, None,
        "Template over row columns for causal models, e.g. 'Summarize:\\n{text}'."),
    Key("model.chat_template", Flag(), False, "Wrap the prompt as a user turn with the tokenizer's chat template."),
    Key("model.pooling", AnyOf(Null(), Choice(*POOLING, "none")), None,
        "feature-extraction: how token vectors become one; null = the checkpoint's (sentence-transformers), "
        "else mean; none keeps every token's vector."),
    Key("model.normalize", AnyOf(Null(), Flag()), None,
        "feature-extraction: L2-normalise each embedding; null = as the checkpoint does (a Normalize module), "
        "else false."),
    Key("model.prompt_name", OPTIONAL_TEXT, None,
        "feature-extraction: the checkpoint's prompt to prepend (e.g. query); null = its default prompt, if any."),
    Key("model.sentence_transformers", Flag(), True,
        "feature-extraction: follow the checkpoint's sentence-transformers modules (modules.json) where it has them."),
    # model.engine: where generation runs (docs: Engines)
    Key("model.engine.kind", Choice(*ENGINES), "transformers",
        "transformers: the model in this process; vllm or sglang: batchrun starts that server on the device; server: "
        "an OpenAI-compatible server, started from engine.command or reached at engine.url."),
    Key("model.engine.command", AnyOf(Null(), TextList()), None,
        "kind server: the command that starts an OpenAI-compatible server; {model}, {port} (a free port batchrun "
        "picks) and {device} are filled in."),
    Key("model.engine.url", OPTIONAL_TEXT, None,
        "kind server: the base URL of a running OpenAI-compatible server (http://host:8000); nothing is started. "
        "Not part of the run's identity."),
    Key("model.engine.args", TextList(), [],
        "Arguments appended to the server's command (--tensor-parallel-size 4, --max-model-len 8192, ...)."),
    Key("model.engine.api", AnyOf(Null(), Choice("completions", "chat")), None,
        "completions (/v1/completions) or chat (/v1/chat/completions); null follows model.chat_template."),
    Key("model.engine.max_concurrency", Integer(minimum=1), 64, "Requests in flight per process."),
    Key("model.engine.request_timeout", Number(1, 86400), 600, "Seconds one request may take before it is retried."),
    Key("model.engine.retries", Integer(minimum=0), 6,
        "Retries of a request after a connection error, a timeout, 429 or 5xx (exponential backoff with jitter, "
        "Retry-After honoured); past them the run exits 1."),
    Key("model.engine.restarts", Integer(minimum=0), 2,
        "How many times a server batchrun started is restarted after it dies; past them the run exits 1."),
    Key("model.engine.startup_timeout", Number(1, 86400), 900,
        "Seconds a started server has to answer /health; past them the run exits 1 with its last log lines."),
    Key("model.engine.request", Mapping(description="a mapping of request fields"), {},
        "Fields added to every request (seed, presence_penalty, response_format, ...); part of the run's identity.",
        open=True),
    Key("model.engine.api_key", OPTIONAL_TEXT, None,
        "Bearer token sent to the server, usually ${VAR}; never recorded, logged or part of the run's identity."),
    Key("model.engine.headers", Mapping(Text(), "a mapping of header name to value"), {},
        "Extra HTTP headers sent to the server; never recorded, logged or part of the run's identity.", open=True),
    # dataset
    Key("dataset.path", Text(), REQUIRED,
        "A builder (json, csv, parquet, text, arrow) with data_files, a hub id, a local directory, a save_to_disk "
        "directory or one data file (docs: Datasets)."),
    Key("dataset.name", OPTIONAL_TEXT, None, "The dataset's configuration name."),
    Key("dataset.data_files", DATA_FILES, None, "File, list of files or {split: files} for a builder.", open=True),
    Key("dataset.options", AnyOf(Null(), Mapping(description="a mapping of the builder's options")), {},
        "Options of the builder that reads the files, checked against its config: csv sep, quotechar, encoding, "
        "skiprows; json field, encoding; text sample_by (docs: Datasets). Part of the run's identity.", open=True),
    Key("dataset.split", SPLIT, "train",
        "Split to read; slicing such as train[1000:2000] is allowed (row ids stay positions in the whole split)."),
    Key("dataset.revision", OPTIONAL_TEXT, None, "Hub branch, tag or commit of the dataset."),
    Key("dataset.streaming", Flag(), True,
        "Stream rows instead of downloading and converting the whole split first."),
    Key("dataset.input_column", Text(), "text", "Column holding each row's input text."),
    Key("dataset.image_column", Text(), "image",
        "image-classification: column holding each row's image: a datasets Image (bytes and path), bytes or a path."),
    Key("dataset.keep_columns", TextList(), [], "Columns copied to the output unchanged."),
    Key("dataset.storage_options", STORAGE_OPTIONS, {},
        "fsspec options for s3://, gs:// or az:// data_files (key, secret, endpoint_url, ...), passed to datasets; "
        "never recorded, and not part of the run's identity.", open=True),
    # batching
    Key("batching.max_batch_size", Integer(minimum=1), 64, "Most rows in one batch."),
    Key("batching.max_tokens", AnyOf(Choice("auto"), Integer(minimum=1)), "auto",
        "Budget of padded tokens per batch (longest row x rows); auto: 4096 on a CPU, 16384 on an accelerator."),
    Key("batching.max_length", AnyOf(Null(), Integer(minimum=1)), None,
        "Truncate inputs to this many tokens; null = the model's limit."),
    Key("batching.num_workers", AnyOf(Choice("auto"), Integer(minimum=0)), "auto",
        "Preprocessing worker processes; 0 preprocesses in the main one; auto: measured on the first parts, "
        "from the cores and the time preprocessing takes beside the model."),
    # output
    Key("output.path", Text(), DERIVED,
        "Directory or fsspec URL (s3://, gs://, az://) of the run's Parquet parts; defaults to outputs/<name>."),
    Key("output.storage_options", STORAGE_OPTIONS, {},
        "fsspec options for a URL output.path (key, secret, endpoint_url, ...); never recorded, and not part of the "
        "run's identity.", open=True),
    Key("output.rows_per_part", Integer(minimum=1), 4096,
        "Input rows per Parquet part (the unit of commit and resume)."),
    Key("output.compression", Choice("zstd", "snappy", "gzip", "brotli", "lz4", "none"), "zstd",
        "Parquet compression."),
    # errors
    Key("errors.on_error", Choice("record", "fail"), "record",
        "record: a failed row gets its reason in `error`; fail: stop at the first."),
    Key("errors.max_error_rate", Number(0, 1), 0.0, "Share of failed rows above which the run exits 3."),
    # evaluate
    Key("evaluate.reference_column", OPTIONAL_TEXT, None,
        "Column holding each row's expected output: the run ends by scoring the predictions against it "
        "(docs: Evaluation); carried into the output like a kept column (as reference_<name> where the task's output "
        "has that name)."),
    Key("evaluate.metrics", AnyOf(Null(), TextList()), None,
        "text-classification: accuracy, macro_f1; summarization and text-generation: rouge1, rouge2, rougeL, "
        "exact_match; null = every metric that fits the task."),
)

KEYS_BY_PATH = {key.path: key for key in KEYS}
# every mapping of keys: the top-level sections and those within them (model.engine)
SECTIONS = tuple(dict.fromkeys(".".join(key.path.split(".")[:end]) for key in KEYS
                               for end in range(1, key.path.count(".") + 1)))


def find_key(path: str) -> Key | None:
    """The key at `path`, or the open key above it (model.generation.num_beams -> model.generation)."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        key = KEYS_BY_PATH.get(".".join(parts[:end]))
        if key is not None and (end == len(parts) or key.open):
            return key
    return None
