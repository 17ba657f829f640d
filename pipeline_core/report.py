"""`batchrun report OUTPUT`: an HTML page and PNG charts of a run, from the metrics it recorded per part.

    batchrun report outputs/embed-articles            # -> outputs/embed-articles/_report/report.html
    batchrun report outputs/embed-articles --out /tmp/embed-report

The numbers come from the `_metrics-*.json` of the committed parts (output/metrics.py); `run_facts` turns them into
the summary and the series, and matplotlib (Agg, no display) draws them. The page embeds its charts as data URIs,
so it is one file that can be mailed or attached to a ticket; the PNGs are written beside it too.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline_core.errors import UsageError
from pipeline_core.output.metrics import BATCH_COLUMNS, padding_efficiency
from pipeline_core.output.run_dir import (
    RUN_INFO,
    SUCCESS,
    changed_since_finished,
    committed_parts,
    read_metrics,
    read_run_info,
)
from pipeline_core.output.stores import open_store
from pipeline_core.remote import is_remote

INSTALL = 'pip install "batchrun[report]"'
REPORT_DIR = "_report"  # inside a local OUTPUT: hidden from Parquet readers like the run's other files
MAX_REASONS = 12  # bars in the failures chart; the rest are summed as "other reasons"


@dataclass
class Report:
    directory: Path
    html: Path
    charts: list[Path] = field(default_factory=list)


def default_directory(output: str) -> Path:
    """OUTPUT/_report for a local OUTPUT. A remote one (s3://bucket/run) cannot be opened by a browser, and the page
    is for reading: ./run-report in the current directory."""
    if is_remote(output):
        name = output.rstrip("/").rsplit("/", 1)[-1] or "batchrun"
        return Path(f"{name}-report")
    return Path(output.removeprefix("file://")) / REPORT_DIR


def write_report(output: str, out: str | None = None) -> Report:
    """Read OUTPUT's metrics, draw the charts and write report.html and the PNGs into `out`."""
    store = _open_store(output)
    info = read_run_info(store)
    if not info:
        raise UsageError(f"{output} holds no batchrun run (no {RUN_INFO}); give report a job's output.path")
    names = store.names()
    records = read_metrics(store, info.get("fingerprint"))
    if not records:
        committed = len(committed_parts(names))
        why = (f"its {committed} committed parts were written by a batchrun that did not record metrics yet; "
               "rerun the job with --fresh to record them" if committed else "no part is committed yet")
        raise UsageError(f"{output} has no metrics to report: {why}")
    figure_class = _matplotlib_figure()
    complete = SUCCESS in names and not changed_since_finished(store, info)
    facts = run_facts(records, info, complete=complete, committed=len(committed_parts(names)))
    charts = draw_charts(facts, figure_class)
    directory = Path(out) if out is not None else default_directory(output)
    directory.mkdir(parents=True, exist_ok=True)
    report = Report(directory, directory / "report.html")
    for name, png in charts.items():
        path = directory / f"{name}.png"
        path.write_bytes(png)
        report.charts.append(path)
    report.html.write_text(render_html(facts, charts, output), encoding="utf-8")
    return report


def _open_store(output: str):
    if not is_remote(output) and Path(output).exists() and not Path(output).is_dir():
        raise UsageError(f"{output} is a file, not a run directory; give report a job's output.path")
    return open_store(output)  # a URL's credentials and endpoint come from the environment, as for status


def _matplotlib_figure():
    """matplotlib's Figure, drawn by the Agg canvas (no display, no pyplot state); exit 2 naming the extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(f"batchrun report draws its charts with matplotlib, which is not installed: {INSTALL}") \
            from None
    return Figure


# ---------------------------------------------------------------------------------------------------------------- facts


def run_facts(records: list[dict], info: dict, complete: bool = False, committed: int | None = None) -> dict:
    """Everything the page shows, as plain numbers: the summary, the batches, failures, and each process's parts.

    Time is "processing time": seconds since the first process loaded its model, with the idle gaps between
    attempts (a run killed on Monday and resumed on Tuesday) cut out, so that a chart shows work, not waiting."""
    processes = _processes(records)
    spans = _merge([(p["loaded"], p["ended"]) for p in processes.values()])
    clock = _ActiveClock(spans)
    batches = sorted((clock(ended - seconds), clock(ended), rows, real, padded)
                     for record in records
                     for ended, seconds, rows, real, padded in zip(*(record["batches"][name] for name in BATCH_COLUMNS),
                                                                   strict=True))
    # rows that failed before any batch (unreadable input) count at the moment their part was committed
    unbatched = [(clock(record["ended"]),) * 2 + (record["rows"] - sum(record["batches"]["rows"]),)
                 for record in records]
    throughput = sorted([batch[:3] for batch in batches] + [entry for entry in unbatched if entry[2] > 0])
    failures: dict[str, int] = {}
    for record in records:
        for reason, count in record.get("failures", {}).items():
            failures[reason] = failures.get(reason, 0) + count
    rows = sum(record["rows"] for record in records)
    real = sum(record["real_tokens"] for record in records)
    padded = sum(record["padded_tokens"] for record in records)
    processing = clock.total
    wall = _length(_merge([(p["started"], p["ended"]) for p in processes.values()]))
    for process in processes.values():
        process["progress"] = [(clock(part["ended"]), part["rows"]) for part in process.pop("parts")]
    return {
        "name": info.get("name"),
        "fingerprint": info.get("fingerprint"),
        "model": (info.get("manifest") or {}).get("model", {}).get("name"),
        "task": (info.get("manifest") or {}).get("task"),
        "complete": complete,
        "parts": len(records),
        "committed": committed if committed is not None else len(records),
        "rows": rows,
        "failed_rows": sum(record["failed_rows"] for record in records),
        "truncated_rows": sum(record.get("truncated_rows") or 0 for record in records),  # none before it was recorded
        "wall_seconds": wall,
        "processing_seconds": processing,
        "rows_per_second": rows / processing if processing > 0 else None,
        "tokens_per_second": real / processing if processing > 0 else None,
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_efficiency": padding_efficiency(real, padded),
        "devices": sorted({p["device"] for p in processes.values() if p.get("device")}),
        "dtypes": sorted({p["dtype"] for p in processes.values() if p.get("dtype")}),
        "processes": sorted(processes.values(),
                            key=lambda p: (p.get("shard_index") or 0, p.get("rank") or 0, p["started"])),
        "batches": batches,
        "throughput": throughput,
        "failures": dict(sorted(failures.items(), key=lambda item: (-item[1], item[0]))),
        "resumed_at": [clock(start) for start, _ in spans[1:]],
    }


def _processes(records: list[dict]) -> dict[str, dict]:
    """{worker id: the process, its label, when it started, loaded and last committed, and its parts}."""
    processes: dict[str, dict] = {}
    for record in records:
        identity = record.get("process") or {}
        worker = identity.get("worker") or "unknown"
        process = processes.get(worker)
        if process is None:
            started = identity.get("started", record["started"])
            process = processes[worker] = {
                **identity, "label": _label(identity), "started": started,
                "loaded": identity.get("loaded", started), "ended": record["ended"], "parts": [],
                "rows": 0, "failed_rows": 0}
        process["ended"] = max(process["ended"], record["ended"])
        process["parts"].append({"ended": record["ended"], "rows": record["rows"]})
        process["rows"] += record["rows"]
        process["failed_rows"] += record["failed_rows"]
    for process in processes.values():
        process["parts"].sort(key=lambda part: part["ended"])
        process["parts_done"] = len(process["parts"])
    return processes


def _label(identity: dict) -> str:
    words = []
    if (identity.get("num_shards") or 1) > 1:
        words.append(f"shard {identity.get('shard_index')}/{identity['num_shards']}")
    if (identity.get("world_size") or 1) > 1:
        words.append(f"rank {identity.get('rank')}/{identity['world_size']}")
    words.append(f"pid {identity.get('pid')}")
    return " ".join(words)


def _merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, max(start, end)])
    return [(start, end) for start, end in merged]


def _length(spans: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in spans)


class _ActiveClock:
    """Wall-clock time to processing time: seconds inside the merged spans, gaps between them cut out."""

    def __init__(self, spans: list[tuple[float, float]]):
        self.spans = spans
        self.total = _length(spans)

    def __call__(self, moment: float) -> float:
        elapsed = 0.0
        for start, end in self.spans:
            if moment <= start:
                return elapsed
            if moment <= end:
                return elapsed + moment - start
            elapsed += end - start
        return elapsed


# --------------------------------------------------------------------------------------------------------------- charts


def draw_charts(facts: dict, figure_class) -> dict[str, bytes]:
    """{name: PNG bytes}: throughput, batches, failures (when rows failed), processes (when several ran)."""
    return {name: png(figure) for name, figure in chart_figures(facts, figure_class).items()}


def chart_figures(facts: dict, figure_class) -> dict:
    """{name: matplotlib Figure}, before they are saved: what draw_charts turns into PNGs."""
    charts = {"throughput": _throughput(facts, figure_class), "batches": _batches(facts, figure_class)}
    if facts["failures"]:
        charts["failures"] = _failures(facts, figure_class)
    if len(facts["processes"]) > 1:
        charts["processes"] = _per_process(facts, figure_class)
    return charts


def _integers(axis) -> None:
    """Counts (batches, rows) get whole-number ticks: "2.5 batches" reads as a bug."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _legend_below(figure, ncols: int = 1, loc: str = "outside lower center") -> None:
    """The figure's legend under its axes, never in them: inside, it hid the lines and bars that reached its corner
    (each process's line in processes.png). Constrained layout makes room for it, so the PNG holds it whole."""
    figure.legend(loc=loc, fontsize="small", ncols=ncols)


def png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _throughput(facts: dict, figure_class):
    """Rows/s over processing time, each batch's rows spread over the seconds it ran, with the run's mean."""
    figure = figure_class(figsize=(8, 3.4), layout="constrained")
    axes = figure.subplots()
    total = max(facts["processing_seconds"], max((end for _, end, _ in facts["throughput"]), default=0.0), 1e-3)
    # about two batches a bin: finer shows each batch's gaps as noise, coarser hides slow stretches
    rows = spread(facts["throughput"], total, bins=max(10, min(60, len(facts["throughput"]) // 2)))
    width = total / len(rows)
    edges = [width * index for index in range(len(rows) + 1)]
    rates = [count / width for count in rows]
    axes.stairs(rates, edges, fill=True, alpha=0.35, color="tab:blue")
    axes.stairs(rates, edges, color="tab:blue", label=f"rows/s, in steps of {width:.3g}s")
    if facts["rows_per_second"]:
        axes.axhline(facts["rows_per_second"], color="tab:orange", linestyle="--",
                     label=f"mean {facts['rows_per_second']:,.1f} rows/s")
    for moment in facts["resumed_at"]:
        axes.axvline(moment, color="grey", linestyle=":", linewidth=1)
    if facts["resumed_at"]:
        axes.plot([], [], color="grey", linestyle=":", label="a later attempt starts")
    axes.set_xlim(0, total)
    axes.set_ylim(0, max(rates, default=1.0) * 1.05 or 1.0)
    axes.set_xlabel("processing time (s, from the first model loaded; idle gaps between attempts cut)")
    axes.set_ylabel("rows/s")
    axes.set_title(f"Throughput: {facts['rows']:,} rows in {total:,.1f}s of processing")
    _legend_below(figure, ncols=3)
    axes.grid(alpha=0.3)
    return figure


def spread(spans: list[tuple[float, float, int]], total: float, bins: int) -> list[float]:
    """Rows per bin of `total` seconds cut into `bins`: each batch's rows spread evenly over the seconds it ran
    (a long batch fills the bins it spans instead of landing all in the one it ended in); an instant's rows go to
    its bin."""
    width = total / bins
    rows = [0.0] * bins
    for start, end, count in spans:
        if end - start <= 0:
            rows[min(int(end / width), bins - 1)] += count
            continue
        for index in range(min(int(start / width), bins - 1), min(int(end / width), bins - 1) + 1):
            overlap = min(end, (index + 1) * width) - max(start, index * width)
            rows[index] += count * max(overlap, 0.0) / (end - start)
    return rows


def _batches(facts: dict, figure_class):
    """Rows per batch, and how much of each batch's padded tokens were real ones."""
    figure = figure_class(figsize=(8, 3.4), layout="constrained")
    sizes_axes, padding_axes = figure.subplots(1, 2)
    sizes = [batch[2] for batch in facts["batches"]]
    largest = max(sizes, default=1)
    step = max(1, -(-largest // 30))
    sizes_axes.hist(sizes, bins=range(1, largest + step + 1, step), color="tab:blue", edgecolor="white",
                    align="left" if step == 1 else "mid")
    sizes_axes.set_xlabel("rows per batch")
    sizes_axes.set_ylabel("batches")
    sizes_axes.set_title(f"Batch sizes ({len(sizes):,} batches)")
    efficiencies = [real / padded for _, _, _, real, padded in facts["batches"] if padded]
    padding_axes.hist(efficiencies, bins=[index / 20 for index in range(21)], color="tab:green", edgecolor="white")
    if facts["padding_efficiency"] is not None:
        padding_axes.axvline(facts["padding_efficiency"], color="tab:orange", linestyle="--",
                             label=f"overall {facts['padding_efficiency']:.1%}")
        _legend_below(figure, loc="outside lower right")  # under the padding chart, whose line it names
    padding_axes.set_xlim(0, 1.0)
    padding_axes.set_xlabel("padding efficiency (real / padded tokens)")
    padding_axes.set_ylabel("batches")
    padding_axes.set_title("Padding efficiency per batch")
    for axes in (sizes_axes, padding_axes):
        axes.grid(alpha=0.3)
        _integers(axes.yaxis)
    _integers(sizes_axes.xaxis)
    return figure


def _failures(facts: dict, figure_class):
    reasons = list(facts["failures"].items())
    if len(reasons) > MAX_REASONS:
        rest = sum(count for _, count in reasons[MAX_REASONS - 1:])
        reasons = reasons[:MAX_REASONS - 1] + [(f"{len(reasons) - MAX_REASONS + 1} other reasons", rest)]
    figure = figure_class(figsize=(8, 0.9 + 0.42 * len(reasons)), layout="constrained")
    axes = figure.subplots()
    labels = [_shorten(reason, 70) for reason, _ in reasons][::-1]
    counts = [count for _, count in reasons][::-1]
    bars = axes.barh(range(len(reasons)), counts, color="tab:red")
    axes.bar_label(bars, labels=[f"{count:,}" for count in counts], padding=3, fontsize="small")
    axes.set_yticks(range(len(reasons)), labels, fontsize="small")
    axes.set_xlim(0, max(counts) * 1.15)
    axes.set_xlabel("failed rows")
    _integers(axes.xaxis)
    axes.set_title(f"Failed rows by reason: {facts['failed_rows']:,} of {facts['rows']:,}")
    axes.grid(axis="x", alpha=0.3)
    return figure


def _per_process(facts: dict, figure_class):
    """Each process's committed rows over processing time: who did how much, and when."""
    legend_rows = math.ceil(len(facts["processes"]) / 2)
    figure = figure_class(figsize=(8, 3.2 + 0.2 * legend_rows), layout="constrained")  # the axes keep their height
    axes = figure.subplots()
    for process in facts["processes"]:
        moments, done = [0.0], [0]
        for moment, rows in process["progress"]:
            moments.append(moment)
            done.append(done[-1] + rows)
        line, = axes.step(moments, done, where="post",
                          label=f"{process['label']}: {process['parts_done']} parts, {process['rows']:,} rows")
        axes.plot(moments[1:], done[1:], "o", color=line.get_color(), markersize=3)
    axes.set_xlim(0, max(facts["processing_seconds"], 1e-3) * 1.02)  # the last dot whole
    axes.set_xlabel("processing time (s)")
    axes.set_ylabel("rows committed")
    _integers(axes.yaxis)
    axes.set_title(f"Per process: {len(facts['processes'])} processes, each dot a committed part")
    _legend_below(figure, ncols=2)
    axes.grid(alpha=0.3)
    return figure


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------------------- page


def render_html(facts: dict, charts: dict[str, bytes], output: str) -> str:
    """One self-contained page: the summary table, the charts as data URIs, the processes and the failures."""
    efficiency = facts["padding_efficiency"]
    summary = [
        ("rows", f"{facts['rows']:,}"),
        ("failed rows", f"{facts['failed_rows']:,}"),
        ("truncated rows", f"{facts['truncated_rows']:,} (inputs cut to batching.max_length)"),
        ("wall time", f"{facts['wall_seconds']:,.1f} s"),
        ("processing time", f"{facts['processing_seconds']:,.1f} s"),
        ("rows/s", _rate(facts["rows_per_second"])),
        ("tokens/s", _rate(facts["tokens_per_second"], "{:,.0f}")),
        ("padding efficiency", f"{efficiency:.1%} ({facts['real_tokens']:,} real / {facts['padded_tokens']:,} "
                               "padded tokens)" if efficiency is not None else "-"),
        ("device", ", ".join(facts["devices"]) or "-"),
        ("dtype", ", ".join(facts["dtypes"]) or "-"),
        ("processes", f"{len(facts['processes'])}"),
        ("parts", f"{facts['parts']:,} with metrics of {facts['committed']:,} committed"
                  + ("" if facts["complete"] else " (the run is not complete)")),
    ]
    images = "\n".join(f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                       f"</figure>" for name, png in charts.items())
    processes = "\n".join(
        f"<tr><td>{_e(p['label'])}</td><td>{_e(p.get('host'))}</td><td>{_e(p.get('device'))}</td>"
        f"<td>{_time(p['started'])}</td><td>{_time(p['ended'])}</td><td>{p['parts_done']:,}</td>"
        f"<td>{p['rows']:,}</td><td>{p['failed_rows']:,}</td></tr>" for p in facts["processes"])
    failures = "\n".join(f"<tr><td>{_e(reason)}</td><td>{count:,}</td></tr>"
                         for reason, count in facts["failures"].items()) or '<tr><td colspan="2">none</td></tr>'
    title = f"batchrun report: {facts['name'] or output}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ padding: 0.2em 0.8em; text-align: left; }}
tr:nth-child(even) {{ background: #f4f4f4; }} th {{ border-bottom: 1px solid #999; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }} .muted {{ color: #666; font-size: 0.9em; }}
</style></head><body>
<h1>{_e(title)}</h1>
<p class="muted">{_e(facts['task'])} with {_e(facts['model'])} &middot; OUTPUT {_e(output)} &middot;
fingerprint {_e(facts['fingerprint'])} &middot; generated {_time(time.time())}</p>
<h2>Summary</h2>
<table>{"".join(f"<tr><th scope='row'>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in summary)}</table>
<p class="muted">Rates are over processing time: from each process's model loaded to its last committed part,
overlaps counted once and gaps between attempts left out. Only committed parts are counted.</p>
<h2>Charts</h2>
{images}
<h2>Processes</h2>
<table><tr><th>process</th><th>host</th><th>device</th><th>started</th><th>last part</th><th>parts</th>
<th>rows</th><th>failed</th></tr>
{processes}</table>
<h2>Failed rows by reason</h2>
<table><tr><th>reason</th><th>rows</th></tr>
{failures}</table>
</body></html>
"""


def _rate(value: float | None, spec: str = "{:,.1f}") -> str:
    return spec.format(value) if value is not None else "-"


def _time(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment))


def _e(value) -> str:
    return html.escape(str(value)) if value is not None else "-"
