"""Offline evaluation (evaluate.reference_column / evaluate.metrics): scores checked against values computed here
independently (scikit-learn, the rouge-score package's own scorer called directly, exact match by hand); resumed,
sharded and recomputed runs give the same `_eval.json`; failed rows and null references are skipped, not scored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import accuracy_score, f1_score

import jobs
from jobs import copy_job, start
from pipeline_core.cli import run_cli
from pipeline_core.errors import ManifestError
from pipeline_core.evaluation import Evaluation
from pipeline_core.manifest import load_job

ROOT = Path(__file__).resolve().parent.parent


def scores(out: Path) -> dict:
    return json.loads((out / "_eval.json").read_text())


def classification_rows() -> list[dict]:
    """Rows whose references use the model's labels, a label it never predicts, nulls, and inputs that fail."""
    references = ["negative", "neutral", "positive", "sarcastic", None]
    data = jobs.rows(37, seed=5)
    for index, row in enumerate(data):
        row["label"] = references[index * 7 % 5]
        if index % 9 == 4:
            row["text"] = None  # fails: input column 'text' is null
    return data


def counts(data: list[dict], reference: str) -> tuple[int, int, int]:
    """(scored rows, failed rows, null references among the rows that did not fail) of classification_rows()."""
    failed = sum(row["text"] is None for row in data)
    nulls = sum(row["text"] is not None and row[reference] is None for row in data)
    return len(data) - failed - nulls, failed, nulls


def expected_classification(out: Path) -> tuple[list[str], list[str]]:
    """(references, predictions) of the rows that succeeded and have a reference, from the output itself."""
    table = pd.read_parquet(out)
    scored = table[table["error"].isna() & table["reference_label"].notna()]
    return scored["reference_label"].tolist(), scored["label"].tolist()


# ---- the manifest


@pytest.mark.parametrize("task, section, message", [
    ("text-classification", {"reference_column": "label", "metrics": ["acuracy"]},
     "evaluate.metrics: unknown metric 'acuracy'; did you mean accuracy? metrics that fit text-classification: "
     "accuracy, macro_f1"),
    ("text-classification", {"reference_column": "label", "metrics": ["rouge1"]},
     "evaluate.metrics: rouge1 does not fit text-classification; metrics that fit it: accuracy, macro_f1"),
    ("summarization", {"reference_column": "gold", "metrics": ["accuracy"]},
     "evaluate.metrics: accuracy does not fit summarization; metrics that fit it: rouge1, rouge2, rougeL, "
     "exact_match"),
    ("text-classification", {"metrics": ["accuracy"]}, "evaluate.metrics needs evaluate.reference_column"),
    ("feature-extraction", {"reference_column": "gold"}, "evaluate: the feature-extraction task has no metrics"),
    ("text-classification", {"reference_column": "label", "metrics": []}, "evaluate.metrics is empty"),
    ("text-classification", {"reference_column": "label", "metrics": ["accuracy", "accuracy"]},
     "evaluate.metrics lists accuracy more than once"),
    ("text-classification", {"reference_column": "label", "metrics": "accuracy"},
     "evaluate.metrics must be null or a list of strings"),
    ("text-classification", {"reference_column": "label", "metric": ["accuracy"]}, "evaluate.metric"),
])
def test_a_bad_evaluate_section_is_a_manifest_error_naming_it(tmp_path, task, section, message):
    job = jobs.write_manifest(tmp_path / "job.yaml", jobs.manifest("m", task=task, evaluate=section))
    with pytest.raises(ManifestError) as error:
        load_job(job)
    assert message in str(error.value)


def test_the_reference_beside_a_prediction_column_of_its_name_is_carried_as_reference_name(tmp_path):
    job = jobs.write_manifest(tmp_path / "job.yaml", jobs.manifest(
        "m", dataset={"path": "json", "data_files": "x.jsonl", "keep_columns": ["reference_label"]},
        evaluate={"reference_column": "label"}))
    with pytest.raises(ManifestError, match="carried into the output as reference_label"):
        load_job(job)
    jobs.edit_job(job, dataset={"keep_columns": ["id"]})
    assert load_job(job).get("evaluate.metrics") is None  # null: every metric that fits the task


# ---- the statistics of one part, by hand


def test_part_statistics_and_scores_by_hand():
    evaluation = Evaluation("text-classification", "gold", ("accuracy", "macro_f1"), {0: "a", 1: "b"})
    table = pa.table({"row_id": [0, 1, 2, 3, 4, 5, 6], "gold": ["a", "a", "b", "c", None, "a", "b"],
                      "label": ["a", "b", "b", "a", "a", None, "b"],
                      "error": [None, None, None, None, None, "broken", None]})
    first, second = evaluation.part_statistics(table.slice(0, 4)), evaluation.part_statistics(table.slice(4))
    result = evaluation.result([first, second])
    # scored: (a,a) (a,b) (b,b) (c,a) (b,b); skipped: the failed row 5; null reference: row 4
    assert (result["rows"], result["skipped_rows"], result["null_references"]) == (5, 1, 1)
    assert result["metrics"]["accuracy"] == 3 / 5
    # a: tp 1, fp 1, fn 1 -> 0.5; b: tp 2, fp 1 -> 0.8; c: fn 1 -> 0
    assert result["metrics"]["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3, rel=1e-15)
    assert result["labels"]["b"] == {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    # integer references are class ids, named by the model's id2label
    numbered = Evaluation("text-classification", "gold", ("accuracy",), {0: "a", 1: "b"})
    ids = pa.table({"gold": [0, 1, 7], "label": ["a", "a", "7"], "error": pa.array([None] * 3, pa.string())})
    assert numbered.result([numbered.part_statistics(ids)])["metrics"]["accuracy"] == 2 / 3


def test_per_label_counts_within_one_part_by_hand():
    from sklearn.metrics import precision_recall_fscore_support

    evaluation = Evaluation("text-classification", "gold", ("accuracy", "macro_f1"))
    references = ["a", "a", "b", "b", "c", "c", "a", "a", "c"]
    predictions = ["a", "b", "b", "a", "a", "c", "a", "a", "b"]
    table = pa.table({"gold": references, "label": predictions, "error": pa.array([None] * 9, pa.string())})
    stats = evaluation.part_statistics(table)
    # a: right 3 times, predicted for b and c, missed once; b: right, predicted for a and c, missed once; c: right,
    # missed twice
    assert stats["labels"] == {"a": [3, 2, 1], "b": [1, 2, 1], "c": [1, 0, 2]} and stats["correct"] == 5
    result = evaluation.result([stats])
    precision, recall, f1, support = precision_recall_fscore_support(references, predictions, labels=["a", "b", "c"],
                                                                     zero_division=0)
    for position, label in enumerate(["a", "b", "c"]):
        shown = result["labels"][label]
        assert shown["precision"] == pytest.approx(precision[position], rel=1e-15)
        assert shown["recall"] == pytest.approx(recall[position], rel=1e-15)
        assert shown["f1"] == pytest.approx(f1[position], rel=1e-15)
        assert shown["support"] == support[position]
    assert result["metrics"]["macro_f1"] == pytest.approx(f1.mean(), rel=1e-15)
    never_predicted = evaluation.result([evaluation.part_statistics(pa.table({
        "gold": ["z"], "label": ["a"], "error": pa.array([None], pa.string())}))])
    assert never_predicted["labels"]["z"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert never_predicted["labels"]["a"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_generation_statistics_over_two_parts_by_hand():
    from rouge_score import rouge_scorer

    evaluation = Evaluation("summarization", "gold", ("rouge1", "rouge2", "rougeL", "exact_match"))
    first = pa.table({"gold": ["the cat sat on the mat", " a dog ", "x y z", None],
                      "summary_text": ["the cat sat", "a dog", "z y x", "q"],
                      "error": pa.array([None] * 4, pa.string())})
    # no stemming (the default scorer's): "dogs" and "dog", "running" and "runs" differ
    second = pa.table({"gold": ["the dogs were running", "q", "one two"],
                       "summary_text": ["a dog runs", None, "one two"], "error": [None, "failed", None]})
    stats = [evaluation.part_statistics(first), evaluation.part_statistics(second)]
    assert [(s["rows"], s["exact"], s["null_references"], s["skipped_rows"]) for s in stats] == [(3, 1, 1, 0),
                                                                                                 (2, 1, 0, 1)]
    result = evaluation.result(stats)
    scored = [("the cat sat on the mat", "the cat sat"), (" a dog ", "a dog"), ("x y z", "z y x"),
              ("the dogs were running", "a dog runs"), ("one two", "one two")]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for kind in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(gold, summary)[kind].fmeasure for gold, summary in scored) / 5
        assert result["metrics"][kind] == pytest.approx(expected, rel=1e-12)
    assert result["metrics"]["exact_match"] == 2 / 5  # surrounding whitespace does not count
    assert (result["rows"], result["skipped_rows"], result["null_references"], result["parts"]) == (5, 1, 1, 2)
    assert "labels" not in result
    only_exact = Evaluation("summarization", "gold", ("exact_match",))
    assert "rouge" not in only_exact.part_statistics(first)  # ROUGE is computed only when asked for


def test_references_of_other_types_are_compared_as_text_by_hand():
    evaluation = Evaluation("text-classification", "gold", ("accuracy",))
    table = pa.table({"gold": [1.5, 2.0], "label": ["1.5", "2"], "error": pa.array([None] * 2, pa.string())})
    assert evaluation.part_statistics(table)["correct"] == 1  # str(2.0) is "2.0"


def test_footer_statistics_are_used_when_they_cover_the_metrics_by_hand():
    from pipeline_core.evaluation import score_parts
    from pipeline_core.output.run_dir import PartFacts

    evaluation = Evaluation("text-classification", "gold", ("accuracy",))
    stats = {"metrics": ["accuracy"], "rows": 4, "skipped_rows": 0, "null_references": 0, "correct": 3,
             "labels": {"a": [3, 1, 1]}}
    assert evaluation.covers(stats) and not evaluation.covers({**stats, "metrics": []}) and not evaluation.covers(None)
    computed = evaluation.part_statistics(pa.table({"gold": ["a"], "label": ["a"],
                                                    "error": pa.array([None], pa.string())}))
    assert evaluation.covers(computed)  # what a part's footer records covers the metrics it was computed for
    # covered: no part is read (no store is given)
    assert score_parts(evaluation, None, {0: PartFacts(0, 4, 0, stats)})["metrics"]["accuracy"] == 0.75
    with pytest.raises(AttributeError):  # not covered: the part's rows are read
        score_parts(Evaluation("text-classification", "gold", ("accuracy", "macro_f1")), None,
                    {0: PartFacts(0, 4, 0, stats)})


def test_no_scored_row_gives_null_metrics():
    evaluation = Evaluation("summarization", "gold", ("exact_match",))
    table = pa.table({"gold": pa.array([None], pa.string()), "summary_text": ["x"],
                      "error": pa.array([None], pa.string())})
    result = evaluation.result([evaluation.part_statistics(table)])
    assert result["metrics"] == {"exact_match": None} and result["null_references"] == 1


# ---- classification, end to end


@pytest.fixture(scope="module")
def classified(tmp_path_factory, tiny_models):
    """A finished classification run scored against `label`, rows_per_part 4 (10 parts), its stderr."""
    directory = tmp_path_factory.mktemp("classified")
    job = jobs.write_job(directory, tiny_models.text_classifier, classification_rows(),
                         evaluate={"reference_column": "label"})
    process = subprocess.run([sys.executable, "-m", "pipeline_core", "run", str(job), "--no-progress"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    return job, directory / "out", process.stderr


def test_classification_scores_equal_scikit_learns(classified):
    _, out, _ = classified
    result = scores(out)
    references, predictions = expected_classification(out)
    scored, failed, nulls = counts(classification_rows(), "label")
    assert failed and nulls  # the rows hold both
    assert len(references) == result["rows"] == scored
    assert (result["skipped_rows"], result["null_references"]) == (failed, nulls)
    assert result["metrics"]["accuracy"] == pytest.approx(accuracy_score(references, predictions), rel=1e-12)
    assert result["metrics"]["macro_f1"] == pytest.approx(f1_score(references, predictions, average="macro",
                                                                    zero_division=0), rel=1e-12)
    labels = sorted(set(references) | set(predictions))
    assert "sarcastic" in labels and sorted(result["labels"]) == labels  # a label the model never predicts
    per_label = f1_score(references, predictions, labels=labels, average=None, zero_division=0)
    for label, f1 in zip(labels, per_label, strict=True):
        assert result["labels"][label]["f1"] == pytest.approx(f1, rel=1e-12)
    assert (result["reference_column"], result["output_column"], result["parts"]) == ("label", "reference_label", 10)
    table = pd.read_parquet(out)
    assert table.columns.tolist() == ["row_id", "id", "reference_label", "label", "score", "error"]
    carried = pq.read_table(out, columns=["reference_label"]).column(0).to_pylist()
    assert carried == [row["label"] for row in classification_rows()]


def test_the_last_line_and_status_show_the_scores(classified, capsys):
    _, out, stderr = classified
    accuracy = scores(out)["metrics"]["accuracy"]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("summary:") or " summary: " in last
    _, failed, nulls = counts(classification_rows(), "label")
    assert f"scores: accuracy {accuracy:.4f}, macro_f1" in last
    assert f"({failed} failed skipped, {nulls} null references)" in last
    assert run_cli(["status", str(out)]) == 0
    assert f"scores  accuracy {accuracy:.4f}, macro_f1" in capsys.readouterr().out
    assert run_cli(["status", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["evaluation"] == scores(out)


def test_batchrun_evaluate_recomputes_the_same_scores_from_the_rows(classified, tmp_path, capsys):
    _, out, _ = classified
    recorded = scores(out)
    (out / "_eval.json").unlink()
    assert run_cli(["evaluate", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == recorded == scores(out)


def test_batchrun_evaluate_does_not_trust_the_footers(classified, tmp_path, capsys):
    """evaluate reads every part's rows: statistics recorded in a footer are not what it adds up."""
    job, out, _ = classified
    copy = tmp_path / "out"
    copy.mkdir()
    for path in out.iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    recorded = scores(out)
    from pipeline_core.output.run_dir import part_name, read_part_facts
    from pipeline_core.output.store import LocalStore

    store = LocalStore(copy)
    info = json.loads((copy / "_batchrun.json").read_text())
    facts = read_part_facts(store, 0, info["fingerprint"], 4)
    assert facts.evaluation is not None and facts.evaluation["rows"] >= 1
    # rewrite part 0's footer statistics to a lie; its rows stay as they were
    table = pq.read_table(copy / part_name(0))
    metadata = dict(table.schema.metadata)
    metadata[b"batchrun.evaluation"] = json.dumps({**facts.evaluation, "correct": 1000}).encode()
    pq.write_table(table.replace_schema_metadata(metadata), copy / part_name(0))
    info["part_bytes"][0] = (copy / part_name(0)).stat().st_size  # a lie of the same size as the part it replaced
    (copy / "_batchrun.json").write_text(json.dumps(info))
    assert run_cli(["evaluate", str(copy)]) == 0
    assert json.loads(capsys.readouterr().out) == recorded


def test_integer_references_are_named_by_the_models_id2label(tmp_path, tiny_models):
    data = jobs.rows(12, seed=8)
    for index, row in enumerate(data):
        row["gold"] = index % 3  # 0 negative, 1 neutral, 2 positive (tests/tiny_models.py)
    job = jobs.write_job(tmp_path, tiny_models.text_classifier, data, evaluate={"reference_column": "gold"})
    assert jobs.run(job) == 0
    table = pd.read_parquet(tmp_path / "out")
    assert table["gold"].tolist() == [index % 3 for index in range(12)]  # carried unchanged
    names = ["negative", "neutral", "positive"]
    references = [names[value] for value in table["gold"]]
    assert scores(tmp_path / "out")["metrics"]["accuracy"] == pytest.approx(
        accuracy_score(references, table["label"]), rel=1e-12)
    info = json.loads((tmp_path / "out" / "_batchrun.json").read_text())
    assert info["label_names"] == {"0": "negative", "1": "neutral", "2": "positive"}


def test_evaluate_refuses_an_unfinished_run_and_one_without_an_evaluate_section(tmp_path, tiny_models, capsys):
    data = jobs.rows(8)
    plain = jobs.write_job(tmp_path / "plain", tiny_models.text_classifier, data)
    assert jobs.run(plain) == 0
    capsys.readouterr()
    assert run_cli(["evaluate", str(tmp_path / "plain" / "out")]) == 2
    assert "without an evaluate section" in capsys.readouterr().err
    for row in data:
        row["label"] = "neutral"
    scored = jobs.write_job(tmp_path / "scored", tiny_models.text_classifier, data,
                            evaluate={"reference_column": "label"})
    assert jobs.run(scored) == 0
    (tmp_path / "scored" / "out" / "_SUCCESS").unlink()
    capsys.readouterr()
    assert run_cli(["evaluate", str(tmp_path / "scored" / "out")]) == 2
    assert "unfinished run (2 parts committed, no _SUCCESS)" in capsys.readouterr().err


def test_a_missing_reference_column_exits_2_before_any_model_loads(tmp_path, capsys):
    job = jobs.write_job(tmp_path, tmp_path / "no-such-model", jobs.rows(4), evaluate={"reference_column": "gold"})
    assert jobs.run(job) == 2
    error = capsys.readouterr().err
    assert "has no column 'gold'; its columns are id, text" in error and "evaluate.reference_column" in error
    assert not (tmp_path / "out").exists()


def test_rouge_without_its_package_exits_2_naming_the_extra(tmp_path, tiny_models, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # import rouge_score raises ImportError
    data = [{**row, "gold": "x"} for row in jobs.rows(4)]
    job = jobs.write_job(tmp_path, tiny_models.seq2seq, data, task="summarization",
                         evaluate={"reference_column": "gold", "metrics": ["rouge1"]})
    assert jobs.run(job) == 2
    assert "need the rouge-score package: pip install 'batchrun[evaluate]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- generation: ROUGE and exact match


def summaries(tmp_path: Path, model: Path, data: list[dict]) -> list[str]:
    job = jobs.write_job(tmp_path / "plain", model, data, task="summarization",
                         model={"generation": {"max_new_tokens": 12, "num_beams": 1}})
    assert jobs.run(job) == 0
    return pd.read_parquet(tmp_path / "plain" / "out")["summary_text"].tolist()


def test_rouge_and_exact_match_equal_the_rouge_score_packages_own_scorer(tmp_path, tiny_models):
    from rouge_score import rouge_scorer

    data = jobs.rows(15, seed=3)
    generated = summaries(tmp_path, tiny_models.seq2seq, data)
    for index, (row, summary) in enumerate(zip(data, generated, strict=True)):
        # the same text, a partial overlap, an unrelated text, none
        row["gold"] = [summary, " ".join(summary.split()[1:] + ["over", "london"]), "people walk", None][index % 4]
    job = jobs.write_job(tmp_path / "scored", tiny_models.seq2seq, data, task="summarization",
                         model={"generation": {"max_new_tokens": 12, "num_beams": 1}},
                         evaluate={"reference_column": "gold"})
    assert jobs.run(job) == 0
    out = tmp_path / "scored" / "out"
    table = pd.read_parquet(out)
    assert table["summary_text"].tolist() == generated
    result = scores(out)
    scored = [(row["gold"], summary) for row, summary in zip(data, generated, strict=True) if row["gold"] is not None]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])  # the package's default scorer
    for kind in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(gold, summary)[kind].fmeasure for gold, summary in scored) / len(scored)
        assert result["metrics"][kind] == pytest.approx(expected, rel=1e-12)
    assert 0 < result["metrics"]["rouge1"] < 1  # the rows were built to score in between
    exact = sum(gold.strip() == summary.strip() for gold, summary in scored) / len(scored)
    assert result["metrics"]["exact_match"] == exact and exact == pytest.approx(4 / 12)
    assert (result["rows"], result["null_references"], result["skipped_rows"]) == (12, 3, 0)


def test_json_logs_stay_json_when_rouge_is_scored(tmp_path, tiny_models):
    """rouge-score logs through absl, which gives Python's root logger a handler: every line would come twice."""
    data = [{**row, "gold": row["text"]} for row in jobs.rows(6)]
    job = jobs.write_job(tmp_path, tiny_models.seq2seq, data, task="summarization",
                         model={"generation": {"max_new_tokens": 4, "num_beams": 1}},
                         evaluate={"reference_column": "gold"})
    process = subprocess.run([sys.executable, "-m", "pipeline_core", "run", str(job), "--log-format", "json"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    lines = [json.loads(line) for line in process.stderr.splitlines()]
    summary = [line for line in lines if line["event"] == "summary"]
    assert len(summary) == 1 and summary[0]["evaluation"] == scores(tmp_path / "out")
    assert len([line for line in lines if line["event"] == "part_committed"]) == 2


# ---- resume, a change of metrics, shards


@pytest.fixture(scope="module")
def generation_reference(tmp_path_factory, tiny_models):
    """An uninterrupted scored text-generation run, slow enough per part to be killed in the middle."""
    directory = tmp_path_factory.mktemp("generation")
    data = [{**row, "gold": " ".join(row["text"].split()[:6])} for row in jobs.rows(48)]
    job = jobs.write_job(directory, tiny_models.causal_lm, data, task="text-generation", workers=1,
                         model={"generation": {"max_new_tokens": 24, "min_new_tokens": 24, "do_sample": False}},
                         evaluate={"reference_column": "gold"})
    assert jobs.run(job) == 0
    return job, scores(directory / "out")


def test_kill_9_then_resume_gives_the_same_eval_json(tmp_path, generation_reference):
    reference_job, expected = generation_reference
    job = copy_job(reference_job, tmp_path / "killed")
    directory = job.parent
    out = directory / "out"
    log = tmp_path / "killed.log"
    with open(log, "w") as stderr:
        process = start(job, stderr=stderr)
    deadline = time.monotonic() + 120
    while len(list(out.glob("part-*.parquet"))) < 3:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL and not (out / "_eval.json").exists()
    assert jobs.run(job) == 0
    assert scores(out) == expected  # exactly: the same per-part figures, added in the same order


def test_metrics_added_on_resume_are_computed_for_the_parts_already_committed(tmp_path, tiny_models):
    data = classification_rows()
    job = jobs.write_job(tmp_path, tiny_models.text_classifier, data,
                         evaluate={"reference_column": "label", "metrics": ["accuracy"]})
    assert jobs.run(job, "--limit", "37") == 0
    out = tmp_path / "out"
    for name in ("_SUCCESS", "_eval.json", "part-000004.parquet", "part-000009.parquet"):
        (out / name).unlink()  # as a run stopped midway leaves it
    jobs.edit_job(job, evaluate={"metrics": ["accuracy", "macro_f1"]})
    assert jobs.run(job, "--limit", "37") == 0
    references, predictions = expected_classification(out)
    result = scores(out)
    assert result["metrics"]["macro_f1"] == pytest.approx(f1_score(references, predictions, average="macro",
                                                                    zero_division=0), rel=1e-12)
    assert result["metrics"]["accuracy"] == pytest.approx(accuracy_score(references, predictions), rel=1e-12)


def test_shards_give_the_scores_of_one_process(tmp_path, classified):
    reference_job, out, _ = classified
    job = copy_job(reference_job, tmp_path / "shards")
    directory = job.parent
    assert jobs.run(job, "--num-shards", "2", "--shard-index", "1") == 0
    assert not (directory / "out" / "_eval.json").exists()  # the job is not finished yet
    assert jobs.run(job, "--num-shards", "2", "--shard-index", "0") == 0
    assert scores(directory / "out") == scores(out)


def test_a_finished_run_is_scored_again_on_rerun_when_unscored_or_asked_other_metrics(tmp_path, classified):
    reference_job, out, _ = classified
    job = copy_job(reference_job, tmp_path / "again")
    directory = job.parent
    assert jobs.run(job) == 0
    (directory / "out" / "_eval.json").unlink()
    assert jobs.run(job) == 0
    assert scores(directory / "out") == scores(out)
    # other metrics asked of the finished run: scored again, without computing any part
    parts = {path.name: path.stat().st_mtime_ns for path in (directory / "out").glob("part-*.parquet")}
    jobs.edit_job(job, evaluate={"metrics": ["accuracy"]})
    assert jobs.run(job) == 0
    assert scores(directory / "out")["metrics"] == {"accuracy": scores(out)["metrics"]["accuracy"]}
    assert {path.name: path.stat().st_mtime_ns for path in (directory / "out").glob("part-*.parquet")} == parts
    # --fresh discards the scores with the parts: a new run that stops before the end has none
    jobs.edit_job(job, errors={"max_error_rate": None, "on_error": "fail"})
    assert jobs.run(job, "--fresh") == 1  # row 4's null text fails the run
    assert not (directory / "out" / "_eval.json").exists()
    (directory / "rows.jsonl").write_text("")  # an empty input: 0 rows, nothing scored
    assert jobs.run(job, "--fresh") == 0
    assert scores(directory / "out")["rows"] == 0 and scores(directory / "out")["metrics"]["accuracy"] is None


def test_a_torchrun_launch_gives_the_scores_of_one_process(tmp_path, generation_reference):
    reference_job, expected = generation_reference
    job = copy_job(reference_job, tmp_path / "launched")
    directory = job.parent
    torchrun = Path(sys.executable).parent / "torchrun"
    process = subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "pipeline_core", "run", str(job),
                              "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    assert "as rank 0 of 2" in process.stderr
    assert scores(directory / "out") == expected


def test_a_part_whose_footer_lacks_a_metric_is_scored_from_its_rows(tmp_path):
    """A part committed by an attempt that scored exact_match only, scored when ROUGE is added on resume."""
    from rouge_score import rouge_scorer

    from pipeline_core.evaluation import score_parts
    from pipeline_core.output.run_dir import commit_part, read_part_facts
    from pipeline_core.output.store import LocalStore

    store = LocalStore(tmp_path)
    table = pa.table({"row_id": [0, 1], "gold": ["the cat sat", "a dog"], "summary_text": ["the cat", "a dog"],
                      "error": pa.array([None, None], pa.string())})
    earlier = Evaluation("summarization", "gold", ("exact_match",))
    commit_part(store, 0, table, "zstd", "f" * 16, earlier.part_statistics(table))
    facts = {0: read_part_facts(store, 0, "f" * 16, 4)}
    assert facts[0].evaluation["metrics"] == ["exact_match"] and "rouge" not in facts[0].evaluation
    now = Evaluation("summarization", "gold", ("rouge1", "exact_match"))
    result = score_parts(now, store, facts)
    scorer = rouge_scorer.RougeScorer(["rouge1"])
    expected = (scorer.score("the cat sat", "the cat")["rouge1"].fmeasure + 1.0) / 2
    assert result["metrics"] == {"rouge1": pytest.approx(expected, rel=1e-12), "exact_match": 0.5}
