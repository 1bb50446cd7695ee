"""Error classes. Each carries the process exit code it maps to (see docs/ARCHITECTURE.md, "Contracts").

A message says what happened and what to do about it; `cli.main()` prints it on one line and shows a
traceback only with `--debug`.
"""

from __future__ import annotations


class ParityError(Exception):
    """Base class: an expected failure with a user-facing message and an exit code."""

    exit_code = 2

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message} (fix: {self.fix})"


class UsageError(ParityError):
    """Bad flags, bad paths, bad input files (exit 2)."""

    exit_code = 2


class ModelFormatError(UsageError):
    """A model file that is not a valid GGUF, is truncated, or has an unsupported architecture (exit 2)."""


class Unsupported(UsageError):
    """The implementation cannot do what was asked (e.g. capture graph tensors for --locate) (exit 2)."""


class TokenizerMismatch(ParityError):
    """Two tokenizers disagree on the prompt (exit 2)."""

    exit_code = 2


class BackendUnavailable(ParityError):
    """A reference backend is not built / cannot be loaded (exit 2)."""

    exit_code = 2


class NetworkError(ParityError):
    """A download failed (exit 3)."""

    exit_code = 3


class PermissionDenied(ParityError):
    """A file or directory could not be written (exit 4)."""

    exit_code = 4


class BuildError(ParityError):
    """A CMake/compiler step failed (exit 5)."""

    exit_code = 5


class RepairRecursion(ParityError):
    """An auto-repair would re-enter itself (exit 6)."""

    exit_code = 6


class TooNoisy(ParityError):
    """`parity bench` cannot judge: a figure's noise band is wider than the change it must resolve (exit 7).

    Not a pass and not a regression: the machine was too busy (or the samples too few) to tell (parity.bench.noise).
    """

    exit_code = 7


class WorkerError(ParityError):
    """A backend worker process crashed, aborted, timed out or reported an error.

    Lanes turn this into a failed lane (exit 1), never a pass.
    """

    exit_code = 1
