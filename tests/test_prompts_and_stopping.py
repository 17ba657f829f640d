"""Prompts, chat templates and stop requests on the tiny GPT-2, each checked against strings and token ids written
by hand here: the reference never goes through batchrun's own formatting.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import torch
from tiny_models import GPT2_SPECIAL_TOKENS
from transformers import AutoModelForCausalLM, AutoTokenizer

import jobs
from pipeline_core.cli import run_cli
from pipeline_core.data.loader import BatchLimits, prepare_part
from pipeline_core.execute import Interrupted, PartRunner, StopFlag, TokenBudget
from pipeline_core.initializer import initialize
from pipeline_core.manifest import load_job
from pipeline_core.tasks import build_task
from pipeline_core.tasks.text import TextEncoder

PROMPT = "Question: {text} (id {id})\nAnswer:"
ROWS = [
    {"id": "r0", "text": "the quick brown fox", "topic": "animals"},
    {"id": "r1", "text": "a cat sleeps in the warm sun while the dog watches", "topic": "pets"},
    {"id": "r2", "text": "london", "topic": "cities"},
]


def by_hand_prompt(row: dict) -> str:
    return f"Question: {row['text']} (id {row['id']})\nAnswer:"


def by_hand_chat(text: str) -> str:
    """tests/tiny_models.py's CHAT_TEMPLATE for one user turn plus the generation prompt, written out."""
    return GPT2_SPECIAL_TOKENS["bos_token"] + "<|user|>\n" + text + "\n<|assistant|>\n"


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models.causal_lm)


def write_job(directory: Path, model: Path, rows: list[dict], model_keys: dict | None = None,
              generation: dict | None = None) -> Path:
    """A text-generation job over `rows`, 4 new tokens a row unless `generation` says otherwise: batches of at most
    200 tokens and 2 rows, parts of 2 rows."""
    jobs.write_rows(directory / "rows.jsonl", rows)
    generation = generation or {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    job = jobs.job_manifest(directory, model, task="text-generation",
                            model={"generation": generation, **(model_keys or {})},
                            batching={"max_tokens": 200, "max_batch_size": 2}, output={"rows_per_part": 2},
                            errors=None)
    return jobs.write_manifest(directory / "job.yaml", job)


# model.prompt and model.chat_template, unit by unit

def test_prompt_is_filled_in_from_each_rows_columns(tokenizer):
    encoder = TextEncoder(tokenizer, "text", max_length=None, prompt=PROMPT)
    encoded = encoder(pa.Table.from_pylist(ROWS))
    assert encoded.errors == [None] * len(ROWS)
    assert encoded.ids == [tokenizer(by_hand_prompt(row))["input_ids"] for row in ROWS]
    assert encoded.ids != [tokenizer(row["text"])["input_ids"] for row in ROWS]


def test_prompt_may_name_any_column_of_the_row(tokenizer):
    encoder = TextEncoder(tokenizer, "text", max_length=None, prompt="About {topic}: {text}")
    texts, errors = encoder.texts(pa.Table.from_pylist(ROWS))
    assert texts == [f"About {row['topic']}: {row['text']}" for row in ROWS]
    assert errors == [None] * len(ROWS)


def test_a_null_input_fails_its_row_even_with_a_prompt(tokenizer):
    rows = [ROWS[0], {**ROWS[1], "text": None}]
    encoded = TextEncoder(tokenizer, "text", max_length=None, prompt=PROMPT)(pa.Table.from_pylist(rows))
    assert encoded.ids[0] == tokenizer(by_hand_prompt(ROWS[0]))["input_ids"]
    assert (encoded.ids[1], encoded.errors[1]) == (None, "input column 'text' is null")


@pytest.mark.parametrize("prompt", [None, PROMPT], ids=["text", "prompt"])
def test_chat_template_wraps_the_input_as_one_user_turn(tokenizer, prompt):
    encoder = TextEncoder(tokenizer, "text", max_length=None, prompt=prompt, chat_template=True)
    encoded = encoder(pa.Table.from_pylist(ROWS))
    contents = [by_hand_prompt(row) if prompt else row["text"] for row in ROWS]
    expected = [tokenizer(by_hand_chat(content), add_special_tokens=False)["input_ids"] for content in contents]
    assert encoded.ids == expected
    assert all(ids[0] == tokenizer.bos_token_id for ids in encoded.ids)  # the template's BOS, once


# the same settings through a whole run

def reference(model_path: Path, strings: list[str], new_tokens: int, chat: bool) -> list[str]:
    """generate() one hand-written input at a time with settings written here, no padding."""
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    settings = copy.deepcopy(model.generation_config)
    settings.update(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    pad_token_id=tokenizer.eos_token_id)
    texts = []
    for string in strings:
        inputs = tokenizer(string, add_special_tokens=not chat, return_tensors="pt")  # a chat string holds BOS
        with torch.no_grad():
            output = model.generate(**inputs, generation_config=settings)[0, inputs["input_ids"].shape[1]:]
        assert len(output) == new_tokens
        texts.append(tokenizer.decode(output, skip_special_tokens=True))
    return texts


CASES = {  # the model section's keys, the model's input for a row written by hand, whether it is a chat
    "prompt": ({"prompt": PROMPT}, by_hand_prompt, False),
    "chat_template": ({"chat_template": True}, lambda row: by_hand_chat(row["text"]), True),
    "both": ({"prompt": PROMPT, "chat_template": True}, lambda row: by_hand_chat(by_hand_prompt(row)), True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_run_generates_from_the_hand_written_input(tmp_path, tiny_models, case):
    model_keys, written, chat = CASES[case]
    assert run_cli(["run", str(write_job(tmp_path, tiny_models.causal_lm, ROWS, model_keys)), "--no-progress"]) == 0
    got = pd.read_parquet(tmp_path / "out")
    assert got.columns.tolist() == ["row_id", "id", "generated_text", "error"]  # "topic" was read, not kept
    assert got["id"].tolist() == [row["id"] for row in ROWS]
    assert got["generated_text"].tolist() == reference(tiny_models.causal_lm, [written(row) for row in ROWS], 4, chat)


# a stop request (SIGTERM / SIGINT) ends generate() within a token

LONG = {"max_new_tokens": 200, "min_new_tokens": 200, "do_sample": False}


@pytest.fixture(scope="module")
def long_generation(tmp_path_factory, tiny_models):
    """A job and its pipeline that would generate exactly 200 new tokens per row if nothing stopped it."""
    job = load_job(write_job(tmp_path_factory.mktemp("long"), tiny_models.causal_lm, ROWS, generation=LONG))
    pipeline = initialize(job)
    assert (pipeline.generation_config.min_new_tokens, pipeline.generation_config.max_new_tokens) == (200, 200)
    return job, pipeline


class StopAfter:
    """should_stop that answers False `calls` times, then True (or, with a flag, sets the flag then)."""

    def __init__(self, calls: int, flag: StopFlag | None = None):
        self.calls, self.flag, self.asked = calls, flag, 0

    def __call__(self) -> bool:
        self.asked += 1
        if self.flag is None:
            return self.asked > self.calls
        if self.asked == self.calls + 1:
            self.flag.signal_name = "SIGTERM"  # as if the signal arrived while this token was being generated
        return self.flag.requested


def test_a_stop_request_ends_generate_within_a_token(long_generation):
    job, pipeline = long_generation
    should_stop = StopAfter(3)
    task = build_task(job, pipeline, should_stop=should_stop)
    encoded = task.encode(pa.Table.from_pylist(ROWS))
    inputs = task.collate(encoded, [0, 1, 2])
    with torch.inference_mode():
        outputs = task.forward(pipeline.model, inputs)
    new_tokens = outputs.shape[1] - inputs["input_ids"].shape[1]
    assert 1 <= new_tokens <= 3 + 1  # it said stop on its fourth call, so not the 200 tokens asked for


def part_of(task, rows: list[dict]):
    """One prepared part with one row per batch."""
    return prepare_part(0, 0, pa.Table.from_pylist(rows), task, ["id"], BatchLimits(max_tokens=10_000,
                                                                                      max_batch_size=1))


def test_a_stop_during_a_batch_raises_interrupted_and_no_rows_come_back(long_generation):
    job, pipeline = long_generation
    stop = StopFlag()
    should_stop = StopAfter(2, stop)
    task = build_task(job, pipeline, should_stop=should_stop)
    part = part_of(task, ROWS[:2])
    assert len(part.batches) == 2
    lengths, finished = [], []
    forward = task.forward

    def counting_forward(model, inputs):
        outputs = forward(model, inputs)
        lengths.append(outputs.shape[1] - inputs["input_ids"].shape[1])
        return outputs

    task.forward = counting_forward
    runner = PartRunner(task, pipeline.model, pipeline.device, TokenBudget(10_000), stop,
                        on_batch=lambda rows, tokens: finished.append(rows))
    with pytest.raises(Interrupted):
        runner.run(part)
    assert lengths and lengths[0] <= 2 + 1  # the first batch was cut short, not run to 200 tokens
    assert len(lengths) == 1  # and no further batch was started
    assert finished == []  # the cut batch's rows were not counted as done


def test_a_stop_between_batches_takes_no_further_batch(long_generation):
    job, pipeline = long_generation
    stop = StopFlag()
    task = build_task(job, pipeline, should_stop=lambda: stop.requested)
    task.generation_config = copy.deepcopy(task.generation_config)
    task.generation_config.update(max_new_tokens=2, min_new_tokens=2)
    part = part_of(task, ROWS)
    forwards = []
    forward = task.forward
    task.forward = lambda model, inputs: forwards.append(inputs) or forward(model, inputs)

    def after_batch(rows, tokens):
        stop.signal_name = "SIGINT"  # arrives once the first batch is done

    runner = PartRunner(task, pipeline.model, pipeline.device, TokenBudget(10_000), stop, on_batch=after_batch)
    with pytest.raises(Interrupted):
        runner.run(part)
    assert len(forwards) == 1 and len(part.batches) == 3
