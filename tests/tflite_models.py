"""The one recipe the tests use to make a full-integer ``.tflite`` with TensorFlow's converter directly.

Independent of ``edgeq.convert`` on purpose, so tests of the reader, check and
deploy do not depend on the code under test in another module.
"""

from __future__ import annotations

import numpy as np


def int8_tflite(model, samples: np.ndarray, per_channel_dense: bool = True, int16_activations: bool = False) -> bytes:
    """``model`` (a Keras model) as full-int8 TFLite bytes, calibrated one sample at a time on ``samples``
    (with ``int16_activations``: int16x8, int16 activations and I/O, int8 weights)."""
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([samples[i : i + 1]] for i in range(len(samples)))
    if int16_activations:
        conv.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        conv.inference_input_type = conv.inference_output_type = tf.int16
    else:
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = conv.inference_output_type = tf.int8
    if not per_channel_dense:
        # A private converter flag, but the only switch there is (TF 2.16 - 2.21).
        conv._experimental_disable_per_channel_quantization_for_dense_layers = True
    return conv.convert()
