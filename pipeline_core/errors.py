"""Errors a user can cause, each carrying the exit code of the contract.

The CLI prints these as one plain message (no traceback) and exits with `exit_code`;
anything else that escapes is an internal error (exit 1, its traceback with BATCHRUN_DEBUG=1).

    BatchrunError               1  a run-time failure: a scheduler retries
    +-- StorageError            1  OUTPUT could not be read or written (a full disk, a read-only OUTPUT)
    +-- OutputBusy             75  live processes hold OUTPUT (--fresh under them, batchrun's own lock)
    +-- UsageError              2  the job or the command is wrong: fix it, do not retry
        +-- ManifestError       2  every problem of one manifest, together
        +-- NotImplementedYet   2  a command whose issue has not landed

Exit 0 (done), 3 (too many failed rows) and 75 after a stop signal are outcomes of a run, not errors.
"""

from __future__ import annotations

# Exit codes of ../shared/CONTRACT.md, named once.
EXIT_OK = 0
EXIT_FAILURE = 1  # run-time failure: a scheduler retries
EXIT_USAGE = 2  # bad manifest or usage: fix the job, do not retry
EXIT_TOO_MANY_ERRORS = 3
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: retry later, a rerun resumes


class BatchrunError(Exception):
    """A failure with a message meant for the user."""

    exit_code = EXIT_FAILURE


class UsageError(BatchrunError):
    """The job or the command line is wrong; retrying the same command cannot help."""

    exit_code = EXIT_USAGE


class ManifestError(UsageError):
    """Every problem found in one job manifest, reported together."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        super().__init__(self._render())

    def _render(self) -> str:
        if len(self.problems) == 1:
            return f"{self.source}: {self.problems[0]}"
        lines = [f"{self.source}: {len(self.problems)} problems"]
        lines += [f"  - {problem}" for problem in self.problems]
        return "\n".join(lines)


class StorageError(BatchrunError):
    """OUTPUT could not be read or written (a full disk, a read-only filesystem, no permission). Exit 1: committed
    parts stay valid, and a rerun once the cause is fixed resumes."""


class OutputBusy(BatchrunError):
    """A change to OUTPUT that live processes would not survive (--fresh while they write it), or OUTPUT locked by a
    live run of another start."""

    exit_code = EXIT_INTERRUPTED  # a scheduler retries later; the live processes may finish the job meanwhile


class NotImplementedYet(UsageError):
    """A command of the contract whose issue has not landed: it must not pretend success."""
