"""Errors a user can cause, each carrying the exit code of the contract.

The CLI prints these as one plain message (no traceback) and exits with `exit_code`;
anything else that escapes is an internal error.
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


class NotImplementedYet(UsageError):
    """A command of the contract whose issue has not landed: it must not pretend success."""
