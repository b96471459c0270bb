"""TensorFlow, quietly: the one place edgeq imports it, its log lines kept off the terminal.

Nothing here imports TensorFlow at module import time: ``import_tensorflow()``
does, when a stage runs. ``quiet_tensorflow`` is an fd-2 redirect that the
PyTorch path (which never loads TensorFlow) uses too.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import sys
import tempfile
import warnings
from typing import Any, Iterator

from edgeq.errors import EdgeqError


@contextlib.contextmanager
def quiet_tensorflow() -> Iterator[None]:
    """Keep TensorFlow's C++ and Python log lines away from the user.

    Native code writes straight to file descriptor 2, so that is pointed at a
    scratch file; Python's ``sys.stderr`` keeps writing to the real terminal so
    progress stays visible.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError, OSError):
        pass
    try:
        is_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        is_fd2 = False
    saved = os.dup(2)
    scratch = tempfile.TemporaryFile()
    old_stderr = sys.stderr
    replacement = None
    try:
        os.dup2(scratch.fileno(), 2)
        if is_fd2:
            replacement = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8", errors="replace")
            sys.stderr = replacement
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        try:
            sys.stderr.flush()
        except (ValueError, OSError):
            pass
        sys.stderr = old_stderr
        os.dup2(saved, 2)
        os.close(saved)
        scratch.close()
        if replacement is not None:
            replacement.close()


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Make TensorFlow's own ``gc.collect()`` cheap during conversion.

    The SavedModel converter calls ``gc.collect()``, which walks every object
    TensorFlow and Keras have allocated (about 0.2 s, as long as converting a
    small model); frozen objects are skipped.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def import_tensorflow() -> Any:
    """Import TensorFlow with its Python loggers turned down."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf
    except ImportError:
        raise EdgeqError("edgeq convert needs TensorFlow", "pip install 'edgeq[convert]'") from None
    tf.get_logger().setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    return tf


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (cut to ``limit`` characters): converters raise pages."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


@contextlib.contextmanager
def quiet_converters() -> Iterator[None]:
    """litert-torch and litert-quantizer print progress and C++ log lines; keep them from the user.

    Imports no TensorFlow (the PyTorch path uses it too): an fd-2 redirect, stdout
    and stderr captured, and Python logging below errors off meanwhile (torch's own
    log handlers keep the stderr they were made with).
    """
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with quiet_tensorflow(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(level)
