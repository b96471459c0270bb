"""The dependency-free .tflite reader against LiteRT's own schema and real models."""

from __future__ import annotations

import random

import pytest

from edgeq.errors import ModelError
from edgeq.tflite_file import BUILTIN_OP_NAMES, TENSOR_TYPE_NAMES, parse_tflite, read_tflite


def _enum(cls) -> dict[str, int]:
    return {k: v for k, v in vars(cls).items() if not k.startswith("_") and isinstance(v, int)}


def test_op_names_equal_litert_schema():
    from ai_edge_litert import schema_py_generated as schema

    ops = _enum(schema.BuiltinOperator)
    assert len(BUILTIN_OP_NAMES) == max(ops.values()) + 1
    assert {name: BUILTIN_OP_NAMES[code] for name, code in ops.items()} == {n: n for n in ops}


def test_tensor_type_names_equal_litert_schema():
    from ai_edge_litert import schema_py_generated as schema

    types = _enum(schema.TensorType)
    for name, code in types.items():
        assert TENSOR_TYPE_NAMES[code] == name.lower()


@pytest.mark.slow
def test_int8_model_tensors_and_quantization(digits_int8_tflite):
    m = read_tflite(digits_int8_tflite)
    assert m.op_counts["CONV_2D"] == 2 and m.op_counts["FULLY_CONNECTED"] == 1
    (x,) = m.inputs
    assert x.dtype == "int8" and x.shape == (1, 8, 8, 1)
    assert len(x.quantization.scale) == 1 and -128 <= x.quantization.zero_point[0] <= 127
    assert m.outputs[0].dtype == "int8" and m.outputs[0].shape == (1, 10)
    conv = next(o for o in m.operators if o.op == "CONV_2D")
    w = m.main.tensors[conv.inputs[1]]
    assert w.dtype == "int8" and w.has_data and w.shape == (8, 3, 3, 1)
    # Per-channel weights: one scale per output channel, zero points 0 (TFLite int8 spec).
    assert w.quantization.is_per_channel and len(w.quantization.scale) == 8
    assert set(w.quantization.zero_point) == {0} and w.quantization.quantized_dimension == 0
    bias = m.main.tensors[conv.inputs[2]]
    assert bias.dtype == "int32"
    assert m.tensor_dtypes() <= {"int8", "int32"}
    assert m.size_bytes == digits_int8_tflite.stat().st_size and len(m.sha256) == 64


def _only_model_errors(data: bytes) -> None:
    try:
        parse_tflite(data, "fuzz.tflite")
    except ModelError as exc:
        assert "fuzz.tflite" in str(exc)


@pytest.mark.slow
def test_truncated_files_give_model_error(digits_int8_tflite):
    data = digits_int8_tflite.read_bytes()
    for n in list(range(0, 64)) + list(range(64, len(data), 97)):
        _only_model_errors(data[:n])
    with pytest.raises(ModelError):
        parse_tflite(data[:100], "fuzz.tflite")


@pytest.mark.slow
def test_bit_flipped_files_never_raise_anything_else(digits_int8_tflite):
    data = digits_int8_tflite.read_bytes()
    rng = random.Random(0)
    for _ in range(400):
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(min(len(b), 2048))  # the flatbuffer tables sit at the start
            b[pos] ^= 1 << rng.randrange(8)
        _only_model_errors(bytes(b))


def test_garbage_gives_model_error(tmp_path):
    rng = random.Random(1)
    for n in (0, 3, 8, 100, 5000):
        with pytest.raises(ModelError):
            parse_tflite(bytes(rng.randrange(256) for _ in range(n)), "fuzz.tflite")
    for _ in range(200):  # garbage behind a valid identifier
        data = bytes(rng.randrange(256) for _ in range(4)) + b"TFL3" + bytes(rng.randrange(256) for _ in range(200))
        _only_model_errors(data)
    with pytest.raises(ModelError, match="no such file"):
        read_tflite(tmp_path / "missing.tflite")
    with pytest.raises(ModelError, match="directory"):
        read_tflite(tmp_path)
