"""Offline evaluation: score each committed part against the reference column, add the parts up, write _eval.json.

A part's sufficient statistics (row counts, exact-match and ROUGE sums, per-label confusion counts) go into its
Parquet footer when it is committed. So memory does not grow with rows, every process of a scaled-out run scores its
own parts, and the final scores are a sum over the committed parts in part order: a resumed run adds up exactly the
figures an uninterrupted one does. `batchrun evaluate OUTPUT` computes every part's figures again from its rows.

Rows that failed are skipped (`skipped_rows`), never scored as right or wrong; so are rows whose reference is null
(`null_references`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.compute as pc

from pipeline_core.errors import BatchrunError, UsageError
from pipeline_core.manifest.spec import METRICS, reference_output_column
from pipeline_core.output.run_dir import (
    SUCCESS,
    changed_since_finished,
    committed_parts,
    read_part_columns,
    read_part_facts,
    read_run_info,
    status_run_info,
    write_scores,
)
from pipeline_core.output.stores import open_store

PREDICTION_COLUMNS = {"text-classification": "label", "summarization": "summary_text",
                      "text-generation": "generated_text"}
ROUGE = ("rouge1", "rouge2", "rougeL")


@dataclass
class Evaluation:
    """How a run is scored: the reference column, the metrics, and (text-classification) the model's id2label, which
    names integer references: a dataset's class ids are the ids the model was trained on."""

    task: str
    reference_column: str
    metrics: tuple[str, ...]
    label_names: dict[int, str] = field(default_factory=dict)
    _rouge: object = field(default=None, repr=False, compare=False)

    @classmethod
    def from_manifest(cls, manifest: dict, label_names: dict | None = None) -> Evaluation | None:
        """From a full manifest (a Job's config, or the one _batchrun.json recorded); None without an evaluate
        section. The metrics left out (null) are all that fit the task."""
        section = manifest.get("evaluate") or {}
        reference = section.get("reference_column")
        if reference is None:
            return None
        task = manifest["task"]
        metrics = tuple(section.get("metrics") or METRICS[task])
        names = {int(key): str(value) for key, value in (label_names or {}).items()}
        evaluation = cls(task, reference, metrics, names)
        evaluation.check_installed()
        return evaluation

    @property
    def output_column(self) -> str:
        """Where the output carries the reference: its own name, or reference_<name> beside a prediction column of
        the same name (a classification dataset's `label`)."""
        return reference_output_column(self.task, self.reference_column)

    def with_labels(self, label_names: dict | None) -> Evaluation:
        return replace(self, label_names={int(key): str(value) for key, value in (label_names or {}).items()})

    def check_installed(self) -> None:
        """ROUGE comes from the rouge-score package (an extra): missing, the run stops before any model loads."""
        if not any(metric in ROUGE for metric in self.metrics):
            return
        try:
            import rouge_score  # noqa: F401
        except ImportError:
            raise UsageError(f"evaluate.metrics {', '.join(m for m in self.metrics if m in ROUGE)} need the "
                             "rouge-score package: pip install 'batchrun[evaluate]'") from None

    # ---- one part

    def part_statistics(self, table: pa.Table) -> dict:
        """The figures the metrics need from one part's rows (JSON-able, summed over parts by `combine`)."""
        error = table.column("error")
        succeeded = pc.is_null(error)
        reference = table.column(self.output_column)
        scored = pc.and_(succeeded, pc.is_valid(reference))
        references = self._references(reference.filter(scored))
        predictions = [str(value) for value in table.column(PREDICTION_COLUMNS[self.task]).filter(scored).to_pylist()]
        stats: dict = {"metrics": list(self.metrics), "rows": len(references),
                       "skipped_rows": table.num_rows - error.null_count,
                       "null_references": reference.filter(succeeded).null_count}
        if self.task == "text-classification":
            stats["correct"] = sum(r == p for r, p in zip(references, predictions, strict=True))
            stats["labels"] = _confusion(references, predictions)
        else:
            stats["exact"] = sum(r.strip() == p.strip() for r, p in zip(references, predictions, strict=True))
            wanted = [kind for kind in ROUGE if kind in self.metrics]
            if wanted:
                scorer = self._scorer()
                # score(target, prediction): the reference first
                rows = [scorer.score(r, p) for r, p in zip(references, predictions, strict=True)]
                stats["rouge"] = {kind: math.fsum(row[kind].fmeasure for row in rows) for kind in wanted}
        return stats

    def covers(self, stats: dict | None) -> bool:
        """Whether a part's recorded statistics hold what this evaluation's metrics need."""
        return isinstance(stats, dict) and set(self.metrics) <= set(stats.get("metrics") or ())

    def _references(self, column: pa.ChunkedArray) -> list[str]:
        values = column.to_pylist()
        if pa.types.is_integer(column.type):
            return [self.label_names.get(value, str(value)) for value in values]
        return [value if isinstance(value, str) else str(value) for value in values]

    def _scorer(self):
        if self._rouge is None:
            from rouge_score import rouge_scorer, tokenizers  # deferred: imports nltk

            # the package's default scorer (no stemming), as the contract says. Its tokenizer is given, as the default
            # one is: left to choose it, the scorer logs that through absl, whose first log call gives Python's root
            # logger a handler of its own, and every batchrun line after it would be printed twice
            tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
            self._rouge = rouge_scorer.RougeScorer(list(ROUGE), tokenizer=tokenizer)
        return self._rouge

    # ---- the run

    def result(self, statistics: list[dict]) -> dict:
        """_eval.json from every part's statistics, in part order."""
        total = combine(statistics)
        rows = total["rows"]
        scores = {}
        for metric in self.metrics:
            if not rows:
                scores[metric] = None
            elif metric == "accuracy":
                scores[metric] = total["correct"] / rows
            elif metric == "macro_f1":
                scores[metric] = _macro_f1(total["labels"])
            elif metric == "exact_match":
                scores[metric] = total["exact"] / rows
            else:
                scores[metric] = total["rouge"][metric] / rows
        result = {"metrics": scores, "rows": rows, "skipped_rows": total["skipped_rows"],
                  "null_references": total["null_references"], "reference_column": self.reference_column,
                  "output_column": self.output_column,
                  "parts": len(statistics)}
        if self.task == "text-classification":
            result["labels"] = _per_label(total["labels"])
        return result


def combine(statistics: list[dict]) -> dict:
    """The sum of parts' statistics; ROUGE sums with math.fsum, in the order given (part order)."""
    total = {"rows": 0, "skipped_rows": 0, "null_references": 0, "correct": 0, "exact": 0, "labels": {}}
    rouge: dict[str, list[float]] = {}
    for stats in statistics:
        for key in ("rows", "skipped_rows", "null_references", "correct", "exact"):
            total[key] += stats.get(key, 0)
        for label, counts in (stats.get("labels") or {}).items():
            kept = total["labels"].setdefault(label, [0, 0, 0])
            for position, count in enumerate(counts):
                kept[position] += count
        for kind, value in (stats.get("rouge") or {}).items():
            rouge.setdefault(kind, []).append(value)
    total["rouge"] = {kind: math.fsum(values) for kind, values in rouge.items()}
    return total


def _confusion(references: list[str], predictions: list[str]) -> dict[str, list[int]]:
    """{label: [true positives, false positives, false negatives]} over the labels seen in either."""
    counts: dict[str, list[int]] = {}
    for reference, prediction in zip(references, predictions, strict=True):
        if reference == prediction:
            counts.setdefault(reference, [0, 0, 0])[0] += 1
        else:
            counts.setdefault(prediction, [0, 0, 0])[1] += 1
            counts.setdefault(reference, [0, 0, 0])[2] += 1
    return counts


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def _macro_f1(labels: dict[str, list[int]]) -> float:
    """The unweighted mean of per-label F1 over the labels seen in references and predictions (scikit-learn's
    f1_score(average="macro"), where a label never predicted correctly scores 0)."""
    return sum(_f1(*counts) for counts in labels.values()) / len(labels)


def _per_label(labels: dict[str, list[int]]) -> dict[str, dict]:
    shown = {}
    for label in sorted(labels):
        tp, fp, fn = labels[label]
        shown[label] = {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
                        "f1": _f1(tp, fp, fn), "support": tp + fn}
    return shown


def score_line(result: dict | None) -> str:
    """`accuracy 0.9123, macro_f1 0.8800 over 57 rows (2 failed skipped, 1 null reference)` for logs and status."""
    if not result or not isinstance(result.get("metrics"), dict):
        return ""
    scores = ", ".join(f"{name} {value:.4f}" if isinstance(value, (int, float)) else f"{name} -"
                       for name, value in result["metrics"].items())
    skipped = []
    if result.get("skipped_rows"):
        skipped.append(f"{result['skipped_rows']:,} failed skipped")
    if result.get("null_references"):
        skipped.append(f"{result['null_references']:,} null reference{'s' if result['null_references'] > 1 else ''}")
    return f"{scores} over {result.get('rows', 0):,} rows" + (f" ({', '.join(skipped)})" if skipped else "")


def part_statistics_of(evaluation: Evaluation, store, facts) -> dict:
    """A committed part's statistics: those its footer holds when they cover the metrics (a run whose metrics were
    changed between attempts lacks some), else computed again from its rows."""
    if evaluation.covers(facts.evaluation):
        return facts.evaluation
    return evaluation.part_statistics(read_part_columns(store, facts.index, _scored_columns(evaluation)))


def score_parts(evaluation: Evaluation, store, facts: dict, recompute: bool = False) -> dict:
    """_eval.json for the committed parts `facts` ({index: PartFacts}), in part order; `recompute`: from every
    part's rows, whatever its footer holds (`batchrun evaluate`)."""
    statistics = []
    for index in sorted(facts):
        if recompute:
            table = read_part_columns(store, index, _scored_columns(evaluation))
            statistics.append(evaluation.part_statistics(table))
        else:
            statistics.append(part_statistics_of(evaluation, store, facts[index]))
    return evaluation.result(statistics)


def model_label_names(pipeline) -> dict | None:
    """text-classification's id2label, which names integer references (other models' configs have a default one that
    names nothing)."""
    if pipeline.task != "text-classification":
        return None
    return {str(key): value for key, value in (getattr(pipeline.model.config, "id2label", None) or {}).items()}


def scored_as_asked(scores: dict | None, evaluation: Evaluation) -> bool:
    return scores is not None and list(scores.get("metrics") or {}) == list(evaluation.metrics)


def score_finished_run(run_dir, evaluation: Evaluation, rows_per_part: int) -> None:
    """_eval.json of a finished run that lacks it (unscored, removed, or other metrics asked for), from its parts."""
    info = read_run_info(run_dir.store)
    evaluation = evaluation.with_labels(info.get("label_names"))
    done = run_dir.verified_parts(info.get("fingerprint"), rows_per_part)
    write_scores(run_dir.store, score_parts(evaluation, run_dir.store, done))


def _scored_columns(evaluation: Evaluation) -> list[str]:
    return [evaluation.output_column, PREDICTION_COLUMNS[evaluation.task], "error"]


def evaluate_output(output: str) -> dict:
    """`batchrun evaluate OUTPUT`: the scores of a finished run computed again from its parts' rows, written to
    _eval.json. A usage error (exit 2) for a run that is not finished or has no evaluate section."""
    store = open_store(output)  # a URL's credentials come from the environment, as for status
    info = status_run_info(store, output)
    manifest = info.get("manifest")
    evaluation = Evaluation.from_manifest(manifest, info.get("label_names")) if isinstance(manifest, dict) else None
    if evaluation is None:
        raise UsageError(f"{output} holds a run without an evaluate section (evaluate.reference_column), so its "
                         "parts have no reference to score against; add one to the job and run it into a new "
                         "output.path")
    indices = sorted(committed_parts(store.names()))
    if not store.exists(SUCCESS):
        raise UsageError(f"{output} holds an unfinished run ({len(indices)} parts committed, no {SUCCESS}); rerun "
                         "the job to finish it, then evaluate it")
    changed = changed_since_finished(store, info)
    if changed:
        raise UsageError(f"{output}: parts {', '.join(map(str, changed[:5]))} went missing or changed since the run "
                         "finished; rerun the job to compute them again, then evaluate it")
    rows_per_part = info["identity"]["output.rows_per_part"]
    facts = {index: read_part_facts(store, index, info["fingerprint"], rows_per_part, split_start=None)
             for index in indices}
    damaged = [index for index, found in facts.items() if found is None]
    if damaged:
        raise BatchrunError(f"{output}: parts {', '.join(map(str, damaged[:5]))} are damaged or not from this run; "
                            "rerun the job to compute them again, then evaluate it")
    result = score_parts(evaluation, store, facts, recompute=True)
    write_scores(store, result)
    return result
