"""The `batchrun` command line: thin click wrappers over plain functions, and the exit-code policy.

`batchrun JOB.yaml` is `batchrun run JOB.yaml`. User errors print one message and exit with the
contract's code; a traceback appears only for internal errors with BATCHRUN_DEBUG=1.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import click

from pipeline_core import __version__
from pipeline_core.errors import EXIT_FAILURE, EXIT_INTERRUPTED, BatchrunError, UsageError
from pipeline_core.logs import final_line, json_requested, route_datasets_logs, setup_logging
from pipeline_core.manifest import Job, load_job
from pipeline_core.output.store import os_reason

SET_HELP = "Override one manifest key by its dotted path; VALUE is YAML (batching.max_tokens=8192). Repeatable."


class _WholeSentence(click.Command):
    """A command listed in `batchrun --help` by the whole first sentence of its docstring, which click wraps.

    Click's default cuts it to fit one line and ends it with "...", which hid the end of most descriptions.
    """

    def get_short_help_str(self, limit: int = 45) -> str:
        return super().get_short_help_str(limit=sys.maxsize)


class _RunByDefault(click.Group):
    """Treat `batchrun JOB.yaml ...` as `batchrun run JOB.yaml ...`."""

    command_class = _WholeSentence

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_RunByDefault, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="batchrun")
def cli():
    """Run a Hugging Face model over a dataset from a YAML job manifest, into resumable Parquet parts.

    `batchrun JOB.yaml` is short for `batchrun run JOB.yaml`.
    """


def _set_option(function):
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)(function)


@cli.command()
@click.argument("job_file", metavar="JOB.yaml")
@_set_option
@click.option("--output", metavar="PATH", help="Output directory; same as --set output.path=PATH.")
@click.option("--limit", type=click.IntRange(min=1), help="Process only the first N rows of the split (a smoke run).")
@click.option("--fresh", is_flag=True, help="Discard what OUTPUT holds and start over.")
@click.option("--num-shards", metavar="N|auto",
              help="Run one of N independent shards (with --shard-index); auto: SLURM_ARRAY_TASK_COUNT.")
@click.option("--shard-index", metavar="I|auto",
              help="Which shard, 0 to N-1; auto: JOB_COMPLETION_INDEX (Kubernetes indexed Job) or "
                   "SLURM_ARRAY_TASK_ID minus SLURM_ARRAY_TASK_MIN (Slurm array).")
@click.option("--no-progress", is_flag=True, help="Log a line every few seconds instead of a progress bar.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="text: short lines for people; json: one JSON object a line (event, part, rows, rates, ETA).")
def run(job_file, overrides, output, limit, fresh, num_shards, shard_index, no_progress, log_format):
    """Run the job; resumes when OUTPUT holds a compatible unfinished run."""
    started = time.monotonic()
    from pipeline_core.layout import layout_from  # deferred: imports torch

    layout = layout_from(num_shards, shard_index)
    extra = [f"output.path={output}"] if output is not None else []
    job = load_job(job_file, [*overrides, *extra])
    setup_logging(tag=layout.tag(), log_format=log_format, fields={**layout.log_fields(), "pid": os.getpid()})
    route_datasets_logs()
    from pipeline_core.runner import RunOptions, run_job  # deferred: imports torch, transformers, datasets

    # a bar's carriage returns would break JSON lines: json logs progress as lines
    bar = False if no_progress or log_format == "json" else None
    options = RunOptions(limit=limit, fresh=fresh, progress_bar=bar, layout=layout, started=started)
    raise SystemExit(run_job(job, options))


@cli.command()
@click.argument("job_files", nargs=-1, required=True, metavar="JOB.yaml...")
@_set_option
def validate(job_files, overrides):
    """Check manifests without loading a model; prints every problem at once."""
    failed = 0
    for job_file in job_files:
        try:
            job = load_job(job_file, list(overrides))
        except UsageError as error:
            failed += 1
            click.echo(f"error: {error}", err=True)
        else:
            click.echo(f"{job_file}: ok ({describe(job)})")
    if failed:
        raise SystemExit(UsageError.exit_code)


def describe(job: Job) -> str:
    """One line a person can check a job by: task, model, data and where it writes."""
    data = job.get("dataset.path")
    if job.get("dataset.data_files"):
        data += f" {job.get('dataset.data_files')}"
    return (
        f"{job.get('task')} with {job.get('model.name')} on {data} [{job.get('dataset.split')}]"
        f" -> {job.get('output.path')}"
    )


@cli.command()
@click.argument("job_file", metavar="JOB.yaml")
@_set_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def plan(job_file, overrides, as_json):
    """Run the staged initializer without processing rows and print what it resolved."""
    job = load_job(job_file, list(overrides))
    setup_logging()
    from pipeline_core.engines.settings import is_served  # deferred: imports torch and transformers

    if is_served(job):
        from pipeline_core.engines.served import plan_served

        summary = plan_served(job)
    else:
        from pipeline_core.initializer import initialize, plan_summary

        summary = plan_summary(initialize(job))
    click.echo(json.dumps(summary, indent=2) if as_json else render_plan(job, summary))


def render_plan(job: Job, summary: dict) -> str:
    """The plan as a person reads it: what will run where, and what each stage cost."""
    generation = summary["generation_config"]
    if summary.get("engine"):
        return _render_served_plan(job, summary)
    rows = [
        ("task", summary["task"]),
        ("model", f"{summary['model_class']} from {job.get('model.name')}"),
        ("tokenizer", summary["tokenizer_class"] or "-"),
        ("processor", summary["processor_class"] or "-"),
        ("device", f"{summary['device']} ({summary['dtype']})"),
        ("device map", json.dumps(summary["hf_device_map"]) if summary["hf_device_map"] else "-"),
        ("input prefix", repr(summary["input_prefix"]) if summary["input_prefix"] else "-"),
        ("generation", ", ".join(f"{k}={v}" for k, v in sorted(generation.items())) if generation else "-"),
        *[(name, f"{_shown(setting['value'])}  ({setting['source']})")
          for name, setting in (summary.get("embedding") or {}).items()],
        ("stages", ", ".join(f"{s['name']} {s['seconds']:.2f}s" for s in summary["stages"])),
    ]
    return f"plan for {job.source}\n" + "\n".join(f"  {name:<13} {value}" for name, value in rows)


def _render_served_plan(job: Job, summary: dict) -> str:
    engine, generation = summary["engine"], summary["generation_config"]
    rows = [
        ("task", summary["task"]),
        ("engine", f"{engine['kind']} ({engine['api']} API)"),
        ("server", "starts: " + " ".join(engine["command"]) if engine["command"] else f"at {engine['url']}"),
        ("model", f"{engine['served_model']} (as the server names it)" if engine["served_model"]
         else job.get("model.name")),
        ("tokenizer", f"{summary['tokenizer_class']} (prompts shortened here)" if summary["tokenizer_class"]
         else "- (prompts go to the server whole)"),
        ("device", summary["device"]),
        ("request", ", ".join(f"{k}={v}" for k, v in sorted(generation.items())) if generation else "-"),
        ("stages", ", ".join(f"{s['name']} {s['seconds']:.2f}s" for s in summary["stages"])),
    ]
    return f"plan for {job.source}\n" + "\n".join(f"  {name:<13} {value}" for name, value in rows)


def _shown(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "; ".join(value) or "-"
    return repr(value) if isinstance(value, str) and value.strip() != value else str(value)


@cli.command()
@click.argument("output", metavar="OUTPUT")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(output, as_json):
    """Progress of a run directory: parts and rows done, rows/s, ETA, complete or not."""
    from pipeline_core.status import render_status, run_status

    found = run_status(output)
    click.echo(json.dumps(found, indent=2) if as_json else render_status(found))


@cli.command()
@click.argument("output", metavar="OUTPUT")
@click.option("--out", metavar="DIR", help="Directory for report.html and the PNG charts; default OUTPUT/_report "
                                           "(for a remote OUTPUT: ./NAME-report in the current directory).")
def report(output, out):
    """Write an HTML page and PNG charts of a run from the metrics it recorded."""
    from pipeline_core.report import write_report  # deferred: matplotlib

    written = write_report(output, out)
    click.echo(f"wrote {written.html} ({', '.join(path.name for path in written.charts)})")


@cli.command()
@click.argument("output", metavar="OUTPUT")
def evaluate(output):
    """Recompute _eval.json from a finished run's parts and print it."""
    from pipeline_core.evaluation import evaluate_output  # deferred: reads Parquet

    click.echo(json.dumps(evaluate_output(output), indent=2))


def describe_os_error(error: OSError) -> str:
    """"cannot use /data/x: No space left on device (errno 28)": the file and the system's reason, one line."""
    files = " and ".join(str(name) for name in (error.filename, error.filename2) if name is not None)
    return f"cannot use {files}: {os_reason(error)}" if files else f"{os_reason(error)} ({type(error).__name__})"


def run_cli(argv: list[str] | None = None) -> int:
    """The command's exit code for every outcome; the stop signals are handled by the caller (entry.main) or by
    the run itself (runner.run_job). With --log-format json the last line of a failure is a JSON object too."""
    debug = os.environ.get("BATCHRUN_DEBUG", "") not in ("", "0")
    say = _json_say if json_requested(sys.argv[1:] if argv is None else argv) else _text_say
    try:
        cli.main(args=argv, prog_name="batchrun", standalone_mode=False)
    except click.exceptions.Exit as done:  # --help, --version
        return done.exit_code
    except click.ClickException as error:  # bad option or argument: click's own message, exit 2
        if say is _text_say:
            error.show()
        else:
            say(error.format_message(), error.exit_code, "usage_error")
        return error.exit_code
    except BatchrunError as error:
        if debug:
            traceback.print_exc()
        say(str(error), error.exit_code)
        return error.exit_code
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else EXIT_FAILURE
    except (KeyboardInterrupt, click.exceptions.Abort):
        say("interrupted", EXIT_INTERRUPTED, "interrupted")
        return EXIT_INTERRUPTED
    except OSError as error:  # I/O that no layer put into words (a full disk, a cache, a device): a run-time failure
        if debug:
            traceback.print_exc()
        say(describe_os_error(error), EXIT_FAILURE)
        return EXIT_FAILURE
    except Exception as error:  # noqa: BLE001 - the last line of defence: one line, no traceback
        if debug:
            traceback.print_exc()
        say(f"{type(error).__name__}: {error}", EXIT_FAILURE, "internal_error", trace=traceback.format_exc())
        return EXIT_FAILURE
    return 0


def _text_say(message: str, exit_code: int, event: str = "error", trace: str | None = None) -> None:
    if event == "interrupted":
        click.echo(message, err=True)
    elif event == "internal_error":
        click.echo(f"internal error: {message}\n(set BATCHRUN_DEBUG=1 for the traceback)", err=True)
    else:
        click.echo(f"error: {message}", err=True)


def _json_say(message: str, exit_code: int, event: str = "error", trace: str | None = None) -> None:
    """The same words as one JSON object; an internal error carries its traceback (the contract allows it)."""
    click.echo(final_line(message, exit_code, event, **({"traceback": trace} if trace else {})), err=True)
