"""Truncation, one rule per kind of input (issue 28), each checked on the exact token ids the model receives:

- encoders and seq2seq models keep the start of the input, as sentence-transformers and the pipelines do, whatever
  side the checkpoint's tokenizer says;
- a prompted or chat-templated input to a decoder keeps its template whole (`Answer:`, the assistant turn) and
  shortens only the row's own text, keeping its start;
- the truncated rows are counted in the summary line and in the metrics of each part.

The references are written here, with the tokenizer alone: a plain scan over the text's token boundaries.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs import edit_job, write_job
from pipeline_core.cli import run_cli
from pipeline_core.tasks.text import TextEncoder

LONG = "the quick brown fox jumps over the lazy dog while people walk through london " * 4
SHORT = "the lazy dog"
PROMPT = "Question: {text}\nAnswer:"


def tokenizer_of(model: Path):
    return AutoTokenizer.from_pretrained(model)


def encode(tokenizer, texts: list[str], **settings):
    return TextEncoder(tokenizer, "text", **settings)(pa.Table.from_pylist([{"text": text} for text in texts]))


def kept_start(tokenizer, text: str, max_length: int, fill=lambda text: text, chat: bool = False) -> list[int]:
    """The ids of the longest start of `text`, cut at a token boundary, whose whole input fits max_length."""
    boundaries = [end for _, end in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                  ["offset_mapping"]]
    for end in reversed(boundaries):
        whole = fill(text[:end])
        if chat:
            whole = tokenizer.apply_chat_template([{"role": "user", "content": whole}], tokenize=False,
                                                  add_generation_prompt=True)
        ids = tokenizer(whole, add_special_tokens=not chat)["input_ids"]
        if len(ids) <= max_length:
            return ids
    raise AssertionError("not even one token of the text fits")


# --- encoders and seq2seq: the start of the input --------------------------------------------------------------------

def test_an_encoder_keeps_the_start_of_the_input(tiny_models):
    tokenizer = tokenizer_of(tiny_models.text_classifier)
    encoded = encode(tokenizer, [LONG, SHORT], max_length=8)
    words = tokenizer(LONG, add_special_tokens=False)["input_ids"]
    assert encoded.ids[0] == [tokenizer.cls_token_id, *words[:6], tokenizer.sep_token_id]
    assert encoded.ids[1] == tokenizer(SHORT)["input_ids"]
    assert encoded.truncated_rows == 1


def test_a_tokenizer_that_truncates_on_the_left_still_keeps_the_start(tiny_models):
    tokenizer = tokenizer_of(tiny_models.text_classifier)
    tokenizer.truncation_side = "left"  # as some checkpoints save it
    encoded = encode(tokenizer, [LONG], max_length=8)
    assert encoded.ids[0][1:3] == tokenizer("the quick", add_special_tokens=False)["input_ids"]


def test_a_seq2seq_input_keeps_its_start_prefix_included(tiny_models):
    tokenizer = tokenizer_of(tiny_models.seq2seq)
    encoded = encode(tokenizer, [LONG, SHORT], max_length=10, prefix="summarize: ")
    words = tokenizer("summarize: " + LONG, add_special_tokens=False)["input_ids"]
    assert encoded.ids[0] == [*words[:9], tokenizer.eos_token_id]
    assert encoded.truncated_rows == 1


def test_a_prompt_to_an_encoder_keeps_the_start_too(tiny_models):
    tokenizer = tokenizer_of(tiny_models.text_classifier)
    encoded = encode(tokenizer, [LONG], max_length=8, prompt="Classify: {text} please")
    assert encoded.ids[0] == tokenizer("Classify: " + LONG, truncation=True, max_length=8)["input_ids"]


# --- decoders: the template whole, the row's text shortened -----------------------------------------------------------

@pytest.mark.parametrize("max_length", [12, 20, 33])
def test_a_decoder_prompt_keeps_its_template_and_shortens_the_rows_text(tiny_models, max_length):
    tokenizer = tokenizer_of(tiny_models.causal_lm)
    encoded = encode(tokenizer, [LONG, SHORT], max_length=max_length, prompt=PROMPT, keep_template=True)
    assert encoded.ids[0] == kept_start(tokenizer, LONG, max_length, fill=lambda text: PROMPT.format(text=text))
    answer = tokenizer("\nAnswer:", add_special_tokens=False)["input_ids"]
    assert encoded.ids[0][-len(answer):] == answer and tokenizer.decode(encoded.ids[0]).startswith("Question: the")
    whole = tokenizer(PROMPT.format(text=SHORT))["input_ids"]
    if len(whole) <= max_length:
        assert encoded.ids[1] == whole  # fits: untouched
    else:
        assert encoded.ids[1] == kept_start(tokenizer, SHORT, max_length, fill=lambda text: PROMPT.format(text=text))
    assert (encoded.errors, encoded.truncated_rows) == ([None, None], 1 + (len(whole) > max_length))


@pytest.mark.parametrize(("text", "prompt", "max_length"), [
    ("dog 🙂 jumps naïve over dog café people the New", "Q:{text}A:", 9),
    ("New naïve the 🙂 london the fox fox people brown", "Text: {text}.", 14),
    ("jumpsnaïvecafélazy🙂foxTokyo,🙂londonwhilepeopleNewthroughnaïve", "<<{text}>>", 19),
])
def test_the_longest_cut_that_fits_is_taken_where_tokens_merge_across_the_template(tiny_models, text, prompt,
                                                                                    max_length):
    """Inside the template a text's bytes may merge into other tokens than its own: counting the text's own tokens
    alone would cut more than needed (found by searching random texts and prompts)."""
    tokenizer = tokenizer_of(tiny_models.causal_lm)
    encoded = TextEncoder(tokenizer, "text", max_length=max_length, prompt=prompt, keep_template=True)(
        pa.Table.from_pylist([{"text": text}]))
    assert encoded.ids[0] == kept_start(tokenizer, text, max_length, fill=lambda cut: prompt.format(text=cut))
    assert len(encoded.ids[0]) == max_length - 1 or len(encoded.ids[0]) == max_length


def test_a_chat_template_keeps_the_assistant_turn_and_shortens_the_rows_text(tiny_models):
    tokenizer = tokenizer_of(tiny_models.causal_lm)
    encoded = encode(tokenizer, [LONG], max_length=48, prompt=PROMPT, chat_template=True, keep_template=True)
    assert encoded.ids[0] == kept_start(tokenizer, LONG, 48, fill=lambda text: PROMPT.format(text=text), chat=True)
    assert tokenizer.decode(encoded.ids[0]).endswith("\nAnswer:\n<|assistant|>\n")
    assert encoded.truncated_rows == 1


def test_other_prompt_fields_are_kept_whole_and_only_the_input_column_shortened(tiny_models):
    tokenizer = tokenizer_of(tiny_models.causal_lm)
    prompt = "Topic: {topic}\n{text}\nAnswer:"
    table = pa.Table.from_pylist([{"text": LONG, "topic": "animals and cities"}])
    encoded = TextEncoder(tokenizer, "text", max_length=20, prompt=prompt, keep_template=True)(table)
    expected = kept_start(tokenizer, LONG, 20, fill=lambda text: prompt.format(topic="animals and cities", text=text))
    assert encoded.ids[0] == expected
    assert tokenizer.decode(expected).startswith("Topic: animals and cities\nthe")


def test_a_chat_template_without_a_prompt_keeps_its_turns_and_shortens_the_text(tiny_models):
    tokenizer = tokenizer_of(tiny_models.causal_lm)
    encoded = encode(tokenizer, [LONG], max_length=30, chat_template=True, keep_template=True)
    assert encoded.ids[0] == kept_start(tokenizer, LONG, 30, chat=True)
    assert tokenizer.decode(encoded.ids[0]).endswith("\n<|assistant|>\n") and encoded.truncated_rows == 1


def test_the_texts_own_boundaries_leave_out_the_special_tokens_a_tokenizer_adds(tiny_models):
    """A tokenizer that adds a token of its own (T5's EOS, a Llama's BOS) must not move the cut: the text's token
    boundaries are its own tokens' ends."""
    tokenizer = tokenizer_of(tiny_models.seq2seq)  # appends </s>
    encoded = encode(tokenizer, [LONG], max_length=16, prompt=PROMPT, keep_template=True)
    expected = kept_start(tokenizer, LONG, 16, fill=lambda text: PROMPT.format(text=text))
    assert encoded.ids[0] == expected and expected[-1] == tokenizer.eos_token_id


def test_without_a_limit_nothing_is_truncated_or_counted(tiny_models):
    tokenizer = tokenizer_of(tiny_models.causal_lm)
    encoded = encode(tokenizer, [LONG], max_length=None, prompt=PROMPT, keep_template=True)
    assert (encoded.ids[0], encoded.truncated_rows) == (tokenizer(PROMPT.format(text=LONG))["input_ids"], 0)


def test_a_template_that_leaves_no_room_for_the_text_fails_its_row(tiny_models):
    tokenizer = tokenizer_of(tiny_models.causal_lm)
    template = len(tokenizer(PROMPT.format(text=""))["input_ids"])
    encoded = encode(tokenizer, [LONG], max_length=template - 1, prompt=PROMPT, keep_template=True)
    reason = (f"the prompt takes {template} tokens without the text of input column 'text', leaving no room for it "
              f"within max_length {template - 1}")
    assert encoded.errors == [reason] and encoded.ids[0] is None
    assert encoded.truncated_rows == 0  # a failed row is not counted as truncated


def test_a_decoder_without_a_prompt_keeps_the_start(tiny_models):
    tokenizer = tokenizer_of(tiny_models.causal_lm)
    encoded = encode(tokenizer, [LONG], max_length=10, keep_template=True)
    assert encoded.ids[0] == tokenizer(LONG)["input_ids"][:10]


# --- through a whole run: what generate() was given, and the counts -------------------------------------------------

def reference_generation(model_path: Path, string: str, new_tokens: int) -> str:
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    tokenizer = tokenizer_of(model_path)
    settings = copy.deepcopy(model.generation_config)
    settings.update(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                    pad_token_id=tokenizer.eos_token_id)
    inputs = tokenizer(string, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, generation_config=settings)[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(output, skip_special_tokens=True)


def test_a_run_generates_from_the_whole_template_and_counts_the_truncated_rows(tmp_path, tiny_models, capsys):
    rows = [{"id": "long", "text": LONG}, {"id": "short", "text": SHORT}, {"id": "long2", "text": LONG[::-1]}]
    job = write_job(tmp_path, tiny_models.causal_lm, rows, task="text-generation", rows_per_part=2,
                    model={"prompt": PROMPT, "generation": {"max_new_tokens": 3, "min_new_tokens": 3,
                                                            "do_sample": False}})
    edit_job(job, batching={"max_length": 20})
    assert run_cli(["run", str(job), "--no-progress", "--log-format", "json"]) == 0
    got = pd.read_parquet(tmp_path / "out").sort_values("row_id")
    tokenizer = tokenizer_of(tiny_models.causal_lm)
    fill = lambda text: PROMPT.format(text=text)  # noqa: E731
    for row, text in zip(got.itertuples(), [LONG, SHORT, LONG[::-1]], strict=True):
        string = tokenizer.decode(kept_start(tokenizer, text, 20, fill=fill))
        assert string.endswith("\nAnswer:")
        assert row.generated_text == reference_generation(tiny_models.causal_lm, string, 3)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    summary = next(line for line in lines if line["event"] == "summary")
    assert summary["truncated_rows"] == 2 and re.search(r"summary: 3 rows, 0 failed, 2 truncated, ", summary["message"])
    metrics = [json.loads(path.read_text()) for path in sorted((tmp_path / "out").glob("_metrics-*.json"))]
    assert [record["truncated_rows"] for record in metrics] == [1, 1]


def test_an_encoder_run_counts_its_truncated_rows_and_says_nothing_when_none_is(tmp_path, tiny_models, capsys):
    rows = [{"id": str(index), "text": LONG if index % 3 == 0 else SHORT} for index in range(7)]
    job = write_job(tmp_path, tiny_models.text_classifier, rows, rows_per_part=4)
    edit_job(job, batching={"max_length": 16})
    assert run_cli(["run", str(job), "--no-progress"]) == 0
    assert "summary: 7 rows, 0 failed, 3 truncated, wall" in capsys.readouterr().err
    metrics = [json.loads(path.read_text()) for path in sorted((tmp_path / "out").glob("_metrics-*.json"))]
    assert [record["truncated_rows"] for record in metrics] == [2, 1]
    assert run_cli(["report", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "_report" / "report.html").read_text()
    assert "<th scope='row'>truncated rows</th><td>3 (inputs cut to batching.max_length)</td>" in page
    edit_job(job, batching={"max_length": 512})
    assert run_cli(["run", str(job), "--no-progress", "--fresh"]) == 0
    assert "summary: 7 rows, 0 failed, wall" in capsys.readouterr().err
