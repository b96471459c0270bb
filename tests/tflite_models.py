"""The one recipe the tests use to make a full-int8 ``.tflite`` with TensorFlow's converter directly.

Independent of ``edgeq.convert`` on purpose, so tests of the reader, check and
deploy do not depend on the code under test in another module.
"""

from __future__ import annotations

import numpy as np


def int8_tflite(model, samples: np.ndarray, per_channel_dense: bool = True) -> bytes:
    """``model`` (a Keras model) as full-int8 TFLite bytes, calibrated one sample at a time on ``samples``."""
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([samples[i : i + 1]] for i in range(len(samples)))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    if not per_channel_dense:
        # A private converter flag, but the only switch there is (TF 2.16 - 2.21).
        conv._experimental_disable_per_channel_quantization_for_dense_layers = True
    return conv.convert()
