"""The one error tree of edgeq.

Every expected failure is an ``EdgeqError`` whose message names the file, key,
op or host involved and says what to do next. Only the CLI turns these into
exit codes (``edgeq.cli._exit``): the library raises and returns results.
"""

from __future__ import annotations


class EdgeqError(Exception):
    """Base of every error edgeq raises on purpose."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}; {self.hint}"
        return self.message


class UsageError(EdgeqError):
    """Options that do not go together, or a value that cannot be right."""


class InputError(EdgeqError):
    """A file the user gave us is missing, unreadable or of the wrong kind."""


class ModelError(InputError):
    """The model file cannot be read as a model."""


class DataError(InputError):
    """Calibration or evaluation data do not fit the model."""


class ConversionError(EdgeqError):
    """TensorFlow could not produce the requested quantized model."""


class RecipeError(EdgeqError):
    """A quantization recipe is unknown, or a recipe file is invalid (message names ``file:key``)."""


class NoRecipeQualifies(EdgeqError):
    """No executable recipe fits the target and stays within the accuracy budget."""


class OverBudget(EdgeqError):
    """No repair brought the quantized model's accuracy drop within ``--max-drop``."""


class TargetError(EdgeqError):
    """A target profile is unknown or invalid (message names ``file:key``)."""


class DeviceError(EdgeqError):
    """Something went wrong talking to, or running on, a device."""

    def __init__(self, message: str, hint: str | None = None, host: str | None = None) -> None:
        super().__init__(message, hint)
        self.host = host

    def __str__(self) -> str:
        text = super().__str__()
        if self.host and self.host not in self.message:
            return f"{self.host}: {text}"
        return text


class ConnectError(DeviceError):
    """The device could not be reached (refused, timed out, DNS)."""


class AuthError(DeviceError):
    """The device refused our credentials."""


class HostKeyError(DeviceError):
    """The device's host key is unknown or has changed."""


class RemoteCommandError(DeviceError):
    """A command on the device failed; carries the command, status and output tail."""

    def __init__(
        self,
        message: str,
        hint: str | None = None,
        host: str | None = None,
        command: str = "",
        exit_status: int | None = None,
        output_tail: str = "",
    ) -> None:
        super().__init__(message, hint, host)
        self.command = command
        self.exit_status = exit_status
        self.output_tail = output_tail


class CommandTooLong(DeviceError):
    """A device command would exceed ``edgeq.transport.MAX_COMMAND_BYTES``; refused before it is sent."""


class RunnerCrashed(DeviceError):
    """The on-device runner (or a local interpreter child) died, e.g. by a signal."""


class DeviceProtocolError(DeviceError):
    """The device answered with something that is not a valid runner document."""


class DeviceBusy(DeviceError):
    """Another deploy holds the device's lock."""
