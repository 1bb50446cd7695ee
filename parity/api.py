"""The Python API for test suites: `check()` runs what `parity run` runs and returns the result object the
CLI renders. An engine project asserts parity inside its own pytest suite:

    from parity.api import check

    def test_my_engine_matches_llama_cpp():
        result = check(impl="cmd:./build/my-engine", prompt="The capital of France is")
        assert result.passed, result.text()

Errors in the input (a bad spec, a missing model, a token mismatch) raise parity.errors.ParityError (its
`exit_code` is what the CLI would exit with); a diverging or failing lane is a result with passed False.
The pytest plugin (parity.pytest_plugin, registered as the `parity` pytest11 entry point) adds fixtures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from parity import options

if TYPE_CHECKING:  # imported by check(), after the workers are started (check/prestart.py)
    from parity.check import job


@dataclass
class CheckResult:
    """What a check found: verdict, exit code, one LaneResult per reference, receipts, the summaries."""

    shared: job.Shared
    lanes: list[job.LaneResult]
    exit_code: int
    format: str = "text"  # the summary format the options asked for (--format, [tool.parity], PARITY_FORMAT)

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    @property
    def receipts(self) -> list[Path]:
        return [lane.receipt_path for lane in self.lanes if lane.receipt_path is not None]

    def summary(self) -> dict[str, Any]:
        """The JSON summary (`parity run --format json`)."""
        from parity.check import summary

        return summary.as_dict(self.shared, self.lanes, self.exit_code)

    def text(self) -> str:
        """The text summary (`parity run`)."""
        from parity.check import summary

        return summary.as_text(self.shared, self.lanes, self.exit_code)

    def render(self, fmt: str | None = None) -> str:
        """The summary in `fmt` (text or json; default: the format the options asked for)."""
        from parity.check import summary

        return summary.render(fmt or self.format, self.shared, self.lanes, self.exit_code)


def check(
    *,
    impl: str | None = None,
    reference: Sequence[str] = ("llama",),
    model: str | Path | None = None,
    tokenizer: str | Path | None = None,
    prompt: str | None = None,
    **settings: Any,
) -> CheckResult:
    """Compare `impl` (a spec: numpy, cmd:..., py:..., logits:..., llama:...) with each `reference` lane.

    `settings` are any other `parity run` options by their names (max_tokens, cos_tol, mse_tol, tie_margin,
    out_dir, threads, timeout, prompt_template, ...); unset ones come from [tool.parity] and PARITY_*
    variables, as on the command line.
    """
    given: dict[str, Any] = {
        "impl": impl,
        "model_gguf": str(model) if model is not None else None,
        "tokenizer": str(tokenizer) if tokenizer is not None else None,
        "prompt": prompt,
        **settings,
    }
    # The reference backends' worker processes start first, while the options are validated and the main job
    # is imported (~0.3 s each way; check/prestart.py)
    from parity.check import prestart

    spawned = prestart.spawn(options.resolve(given, validate=False), list(reference))
    try:
        opts = options.resolve(given)
        from parity.check import job

        shared, lanes = job.run(opts, list(reference), spawned)
    finally:
        prestart.discard(spawned)  # the ones the job did not take
    return CheckResult(shared, lanes, job.exit_code(lanes), opts.format)
