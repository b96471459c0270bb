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


# ------------------------------------------------------- bounded work, not only offsets


def shared_tables_model(subgraphs: int, tensors: int, shape_len: int) -> bytes:
    """A valid FlatBuffer whose vectors all point at ONE subgraph, whose tensors all point at ONE tensor.

    It is about ``4 * (subgraphs + tensors + shape_len)`` bytes but describes
    ``subgraphs * tensors`` tensors of ``shape_len`` dimensions each."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    b = flatbuffers.Builder(1024)
    s.TensorStartShapeVector(b, shape_len)
    for _ in range(shape_len):
        b.PrependInt32(1)
    shape = b.EndVector()
    s.TensorStart(b)
    s.TensorAddShape(b, shape)
    s.TensorAddType(b, 9)
    tensor = s.TensorEnd(b)
    s.SubGraphStartTensorsVector(b, tensors)
    for _ in range(tensors):
        b.PrependUOffsetTRelative(tensor)
    tvec = b.EndVector()
    s.SubGraphStart(b)
    s.SubGraphAddTensors(b, tvec)
    sub = s.SubGraphEnd(b)
    s.ModelStartSubgraphsVector(b, subgraphs)
    for _ in range(subgraphs):
        b.PrependUOffsetTRelative(sub)
    svec = b.EndVector()
    s.ModelStart(b)
    s.ModelAddVersion(b, 3)
    s.ModelAddSubgraphs(b, svec)
    b.Finish(s.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def test_shared_tables_are_refused_after_bounded_work(ledger):
    data = shared_tables_model(100, 100, 100)  # 1.2 KB describing 10,000 tensors, 1,000,000 dimensions
    assert len(data) < 2000
    with pytest.raises(ModelError, match="refer to each other more than"):
        parse_tflite(data, "crafted.tflite")
    ledger("bad_input", ".tflite whose vectors share one table (amplified work)")


def test_the_12kb_crafted_file_fails_fast_in_bounded_memory(tmp_path, ledger):
    """The review's file: 12 KB, a billion tensor dimensions. A child with 1 GiB of address space and a
    minute must get a one-line ModelError (before the fix it built objects until memory ran out)."""
    import subprocess
    import sys

    path = tmp_path / "crafted.tflite"
    path.write_bytes(shared_tables_model(1000, 1000, 1000))
    assert 11_000 < path.stat().st_size < 13_000
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from edgeq.errors import ModelError\n"
        "from edgeq.tflite_file import read_tflite\n"
        "try:\n"
        "    read_tflite(sys.argv[1])\n"
        "except ModelError as exc:\n"
        "    print('ModelError', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.startswith("ModelError") and "crafted.tflite" in out.stdout
    ledger("bad_input", "12 KB .tflite describing a billion tensor dimensions")


def test_check_cli_on_the_crafted_file_is_one_line(tmp_path, ledger):
    from click.testing import CliRunner

    from edgeq.cli import main

    path = tmp_path / "crafted.tflite"
    path.write_bytes(shared_tables_model(300, 300, 30))
    res = CliRunner().invoke(main, ["check", str(path), "--target", "cortex-m4", "--no-measure"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and res.output.startswith("error: ")
    assert "refer to each other more than" in res.output
    ledger("bad_input", "edgeq check on a .tflite with shared tables")


@pytest.mark.slow
def test_real_models_need_less_than_a_quarter_of_the_budget(digits_int8_tflite, digits_float_tflite, monkeypatch):
    import edgeq.tflite_file as tf

    monkeypatch.setattr(tf, "WORK_PER_BYTE", 1)
    monkeypatch.setattr(tf, "WORK_BASE", 0)
    for p in (digits_int8_tflite, digits_float_tflite):
        assert read_tflite(p).subgraphs  # one unit per byte suffices; the real budget is four per byte
