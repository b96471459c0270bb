"""The one place where outcomes become exit codes (the library raises errors and returns results)."""

from __future__ import annotations

from enum import IntEnum

from edgeq.errors import DeviceError, EdgeqError, NoRecipeQualifies, OverBudget, UsageError


class ExitCode(IntEnum):
    """Documented exit codes of the ``edgeq`` command (listed in ``edgeq --help``)."""

    OK = 0
    ERROR = 1  # bad input, bad model, conversion failed
    USAGE = 2  # bad command line (click's own code)
    DOES_NOT_FIT = 3  # `edgeq check`: the model does not fit or run on the target (or misses a --max-* threshold)
    DEVICE = 4  # a device could not be reached or failed during deploy
    NO_RECIPE = 5  # `edgeq sweep`: no executable recipe fits the target within --max-drop
    OVER_BUDGET = 6  # `edgeq convert --max-drop`: no repair brought the accuracy drop within budget
    GATE_FAILED = 7  # a host failed its health gate and was reverted
    REVERT_FAILED = 8  # a host failed its gate and could NOT be reverted
    INTERNAL = 70  # an unexpected exception: a bug in edgeq (EX_SOFTWARE)
    INTERRUPTED = 130
    BROKEN_PIPE = 141  # stdout's reader went away (`edgeq ... | head`); 128 + SIGPIPE, as a shell reports it


# Most specific class first: the first match wins.
_ERROR_CODES: tuple[tuple[type[EdgeqError], ExitCode], ...] = (
    (UsageError, ExitCode.USAGE),
    (NoRecipeQualifies, ExitCode.NO_RECIPE),
    (OverBudget, ExitCode.OVER_BUDGET),
    (DeviceError, ExitCode.DEVICE),
)


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code for an exception: its error class's code, ERROR for other EdgeqErrors, else INTERNAL."""
    if not isinstance(exc, EdgeqError):
        return ExitCode.INTERNAL
    for cls, code in _ERROR_CODES:
        if isinstance(exc, cls):
            return code
    return ExitCode.ERROR


# edgeq.deploy.Outcome is a str Enum: its values, so this module need not import the deploy stage.
_OUTCOME_CODES = {
    "ok": ExitCode.OK,
    "device_failed": ExitCode.DEVICE,
    "gate_failed": ExitCode.GATE_FAILED,
    "revert_failed": ExitCode.REVERT_FAILED,
}


def exit_code_for_outcome(outcome: str) -> ExitCode:
    """The exit code for a deploy, fleet, rollout or Ansible summary outcome (``edgeq.deploy.Outcome``)."""
    return _OUTCOME_CODES[str(getattr(outcome, "value", outcome))]
