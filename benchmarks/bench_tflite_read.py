"""Reading a .tflite: edgeq's own bounded reader vs the schema module ai-edge-litert ships.

Issue 11 asked whether ``edgeq.tflite_file`` should read models through
``ai_edge_litert.schema_py_generated`` (the FlatBuffers-generated Python of the
TFLite schema) instead of its hand-written reader, if that is not slower on a
MobileNet-size model. Three readers produce the same ``TfliteModel`` from the
same bytes, side by side, interleaved for several repetitions:

* ``edgeq``: ``edgeq.tflite_file.parse_tflite`` (struct-based, bounds and work checked);
* ``schema``: the generated accessor API (``Model.GetRootAs(...).Subgraphs(i)...``),
  with the same work budget so it is bounded too;
* ``schema-objects``: the generated object API (``ModelT.InitFromPackedBuf``), which
  unpacks everything, weights included (as numpy), before anything can be read; it
  computes no sha256 and cannot be bounded (it follows every shared reference).

Prints the median time of each and the ratio to ``edgeq``; the results are
checked equal first.

    python benchmarks/bench_tflite_read.py [--model M.tflite] [--reps 7]

Without --model it converts ``keras.applications.MobileNetV2(weights=None)`` to a
float .tflite (or full-int8 with --int8) once, cached in the temp directory (needs TensorFlow).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeq import tflite_file as tf_file  # noqa: E402
from edgeq.tflite_file import (  # noqa: E402
    BUILTIN_OP_NAMES,
    TENSOR_TYPE_NAMES,
    Operator,
    Quantization,
    Subgraph,
    Tensor,
    TfliteModel,
    parse_tflite,
)


def mobilenet_tflite(int8: bool = False) -> Path:
    path = Path(tempfile.gettempdir()) / "edgeq-bench" / f"mobilenetv2_{'int8' if int8 else 'f32'}.tflite"
    if path.exists():
        return path
    import numpy as np
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:  # per-channel int8: one scale per output channel, the reader's heaviest case
        rng = np.random.default_rng(0)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([rng.random((1, 224, 224, 3), dtype=np.float32)] for _ in range(8))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(conv.convert())
    return path


class _Budget:
    def __init__(self, size: int) -> None:
        self.left = tf_file.WORK_PER_BYTE * size + tf_file.WORK_BASE

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise ValueError("work budget exceeded")


def parse_with_schema(data: bytes, where: str = "<bytes>") -> TfliteModel:
    """The same TfliteModel through the generated accessor API (bounded by the same budget)."""
    from ai_edge_litert import schema_py_generated as s

    budget = _Budget(len(data))
    m = s.Model.GetRootAs(data, 0)
    opcodes = []
    n = m.OperatorCodesLength()
    budget.spend(n + 1)
    for i in range(n):
        oc = m.OperatorCodes(i)
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        custom = oc.CustomCode()
        custom = custom.decode("utf-8", "replace") if custom is not None else None
        name = BUILTIN_OP_NAMES[code] if 0 <= code < len(BUILTIN_OP_NAMES) else f"OP_{code}"
        if name == "CUSTOM" and custom:
            name = f"CUSTOM:{custom}"
        opcodes.append((name, custom, oc.Version()))
    sizes = []
    n = m.BuffersLength()
    budget.spend(n + 1)
    for i in range(n):
        b = m.Buffers(i)
        size = b.DataLength() or b.Size()
        sizes.append(size)
    subgraphs = []
    n = m.SubgraphsLength()
    budget.spend(n + 1)
    for si in range(n):
        sg = m.Subgraphs(si)
        tensors = []
        nt = sg.TensorsLength()
        budget.spend(nt + 1)
        for i in range(nt):
            t = sg.Tensors(i)
            q = t.Quantization()
            quant = None
            if q is not None and q.ScaleLength():
                budget.spend(q.ScaleLength() + q.ZeroPointLength() + 2)
                quant = Quantization(tuple(float(x) for x in q.ScaleAsNumpy()),
                                     tuple(int(z) for z in q.ZeroPointAsNumpy()) if q.ZeroPointLength() else (),
                                     q.QuantizedDimension())
            budget.spend(t.ShapeLength() + t.ShapeSignatureLength() + 2)
            shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
            sig = tuple(int(d) for d in t.ShapeSignatureAsNumpy()) if t.ShapeSignatureLength() else ()
            name = t.Name()
            buf = t.Buffer()
            tcode = t.Type()
            tensors.append(Tensor(i, name.decode("utf-8", "replace") if name else f"tensor_{i}",
                                  TENSOR_TYPE_NAMES[tcode] if 0 <= tcode < len(TENSOR_TYPE_NAMES) else f"type{tcode}",
                                  shape, sig or shape, buf, 0 < buf < len(sizes) and sizes[buf] > 0, quant,
                                  bool(t.IsVariable())))
        ops = []
        no = sg.OperatorsLength()
        budget.spend(no + 1)
        for i in range(no):
            o = sg.Operators(i)
            name, custom, ver = opcodes[o.OpcodeIndex()]
            budget.spend(o.InputsLength() + o.OutputsLength() + 2)
            ins = tuple(int(x) for x in o.InputsAsNumpy()) if o.InputsLength() else ()
            outs = tuple(int(x) for x in o.OutputsAsNumpy()) if o.OutputsLength() else ()
            ops.append(Operator(i, name, custom, ver, ins, outs))
        sg_in = tuple(int(x) for x in sg.InputsAsNumpy()) if sg.InputsLength() else ()
        sg_out = tuple(int(x) for x in sg.OutputsAsNumpy()) if sg.OutputsLength() else ()
        sname = sg.Name()
        subgraphs.append(Subgraph(sname.decode("utf-8", "replace") if sname else "", tuple(tensors), tuple(ops),
                                  sg_in, sg_out))
    desc = m.Description()
    return TfliteModel(where, len(data), hashlib.sha256(data).hexdigest(), m.Version(),
                       desc.decode("utf-8", "replace") if desc else "", tuple(subgraphs), tuple(sizes))


def parse_with_schema_objects(data: bytes, where: str = "<bytes>") -> int:
    """The object API: unpack the whole model (weights included) into Python objects."""
    from ai_edge_litert import schema_py_generated as s

    model = s.ModelT.InitFromPackedBuf(bytearray(data), 0)
    return sum(len(sg.tensors or []) for sg in model.subgraphs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a .tflite (default: MobileNetV2 float, converted once)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--int8", action="store_true", help="without --model: MobileNetV2 full-int8 (per-channel)")
    ap.add_argument("--no-objects", action="store_true", help="skip the (slow) object API")
    args = ap.parse_args()

    path = args.model or mobilenet_tflite(args.int8)
    data = path.read_bytes()
    a, b = parse_tflite(data, str(path)), parse_with_schema(data, str(path))
    assert a == b, "the readers disagree"
    n_tensors = sum(len(sg.tensors) for sg in a.subgraphs)
    print(f"{path.name}: {len(data) / 1e6:.1f} MB, {len(a.operators)} ops, {n_tensors} tensors; "
          f"readers agree; {args.reps} interleaved repetitions")

    readers = {"edgeq": lambda: parse_tflite(data, str(path)),
               "schema": lambda: parse_with_schema(data, str(path))}
    readers["sha256 alone"] = lambda: hashlib.sha256(data).hexdigest()  # the floor both readers pay
    if not args.no_objects:
        readers["schema-objects"] = lambda: parse_with_schema_objects(data, str(path))
    times: dict[str, list[float]] = {k: [] for k in readers}
    for fn in readers.values():
        fn()  # warm-up (imports)
    for _ in range(args.reps):
        for name, fn in readers.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["edgeq"])
    floor = statistics.median(times["sha256 alone"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:15s} median {med * 1000:8.1f} ms   ratio to edgeq {med / base:5.2f}x")
    parse = {k: statistics.median(times[k]) - floor for k in ("edgeq", "schema")}
    print(f"  parsing alone (minus sha256): edgeq {parse['edgeq'] * 1000:.1f} ms, schema "
          f"{parse['schema'] * 1000:.1f} ms, ratio {parse['schema'] / parse['edgeq']:.2f}x")
    print("  (schema-objects computes no sha256 and unpacks shared tables once per reference: unbounded)")


if __name__ == "__main__":
    main()
