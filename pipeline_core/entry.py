"""The `batchrun` command's first line: SIGTERM and SIGINT are handled before anything heavy is imported.

click, torch and transformers take seconds to import; a scheduler's SIGTERM in that time must end in exit 75 (retry
later) like one during the run, not in the default handler's 143. Nothing but the stdlib, pipeline_core.errors,
pipeline_core.logs and pipeline_core.signals is imported before the handlers are installed.
"""

from __future__ import annotations

import sys

from pipeline_core.errors import EXIT_INTERRUPTED
from pipeline_core.logs import final_line, json_requested
from pipeline_core.signals import guard_process


def main(argv: list[str] | None = None) -> None:
    """Run the CLI and exit with the contract's code: 75 whenever a stop signal arrived while it ran."""
    guard = guard_process()
    try:
        from pipeline_core.cli import run_cli  # deferred: imports click, and the run imports torch

        code = run_cli(argv)
    except KeyboardInterrupt:  # the second signal, outside run_cli's own handling (during the imports)
        as_json = json_requested(sys.argv[1:] if argv is None else argv)
        print(final_line("interrupted", EXIT_INTERRUPTED, "interrupted") if as_json else "interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    finally:
        guard.finish()
    # a run that finished its last batch as the first signal came still says 75: a rerun finds it done
    sys.exit(EXIT_INTERRUPTED if guard.flag.requested else code)
