"""edgeq.isolate: a stage in a forked child; its crash is an exception, its errors keep their type."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from edgeq.errors import ConversionError
from edgeq.isolate import ChildFailure, StageCrashed, run_forked

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="stages are forked on Linux only")


def _segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def test_result_comes_back():
    assert run_forked("stage", lambda n: bytes(n), 3 << 20) == bytes(3 << 20)  # larger than a pipe buffer


def test_crash_is_an_exception_naming_stage_and_signal(ledger):
    with pytest.raises(StageCrashed) as err:
        run_forked("TensorFlow's calibrator", _segfault)
    assert err.value.signal == "SIGSEGV" and str(err.value) == "TensorFlow's calibrator was killed by SIGSEGV"
    ledger("fault", "stage-segfault")


def test_exit_without_result():
    with pytest.raises(StageCrashed, match="exited with status 3 without a result"):
        run_forked("stage", os._exit, 3)


def test_errors_keep_their_type():
    def edgeq_error() -> None:
        raise ConversionError("no kernel", "try int16x8")

    def other() -> None:
        raise ValueError("'tf.Cos' op is neither a custom op nor a flex op")

    with pytest.raises(ConversionError) as err:
        run_forked("stage", edgeq_error)
    assert err.value.message == "no kernel" and err.value.hint == "try int16x8"
    with pytest.raises(ChildFailure, match="neither a custom op") as failure:
        run_forked("stage", other)
    assert failure.value.type_name == "ValueError"
