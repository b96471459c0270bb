"""Recipes are data (edgeq.recipes) and every claim in targets/_recipes.toml is measured here.

The slow tests make every executable recipe from ONE float export and ONE
calibration of a tiny trained CNN (the stage API the sweep uses), then run each
``.tflite`` in a child process on each runtime this machine has: LiteRT on x86
(ai-edge-litert), tflite-runtime 2.14 (the device venv: numpy 1.x, no
TensorFlow) and TFLite Micro's Python interpreter. A recipe "runs" on a runtime
when the model loads, invokes, and agrees with LiteRT's built-in kernels on the
same input. The table's ``runtimes`` and ``accelerated_on`` must equal what is
measured, both ways (no missing claim, no claim without a run).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edgeq.errors import RecipeError
from edgeq.recipes import RUNTIMES, default_recipes_path, load_recipes

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("fp32", "fp16", "dynamic-int8", "int8", "int8-per-tensor", "int16x8", "int8-weight-only",
            "int4-dynamic", "int4-dynamic-b32", "int4w-int8a", "int2-dynamic-b32",
            "sim-int2-mcu", "sim-kmeans16", "sim-kmeans4")
SHIPPED = load_recipes()
EXECUTABLE = [r.name for r in SHIPPED.executable()]


# ---------------------------------------------------------------- the table (fast, no TensorFlow)


def test_shipped_table_has_every_level():
    assert set(REQUIRED) <= set(SHIPPED.names())
    default = SHIPPED.get("int8")
    assert (default.weights_bits, default.activations, default.granularity, default.quantizer) == \
        (8, "int8", "per-channel", "tflite-converter")
    assert SHIPPED.get("int4-dynamic-b32").block_size == 32
    for name in ("sim-int2-mcu", "sim-kmeans16", "sim-kmeans4"):
        r = SHIPPED.get(name)
        assert not r.executable and r.quantizer == "simulated" and not r.runtimes
    assert SHIPPED.get("sim-kmeans16").centroids == 16 and SHIPPED.get("sim-kmeans4").centroids == 4


def test_every_claim_cites_the_test_that_runs_it():
    text = default_recipes_path().read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"(runtimes|accelerated_on) = \[(.*)\]", line)
        if not m or not m.group(2).strip():
            continue
        j = i
        while j > 0 and lines[j - 1].startswith("#"):
            j -= 1
        comment = " ".join(lines[j:i])
        assert "test_recipes.py::" in comment, (i + 1, line, comment)
        cited = re.findall(r"test_recipes\.py::(\w+)", comment)
        assert all(name in globals() for name in cited), cited


def _write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "mine.toml"
    path.write_text(body)
    return path


GOOD = ('[[recipe]]\nname = "w8"\nweights_bits = 8\nactivations = "int8"\ngranularity = "per-channel"\n'
        'quantizer = "tflite-converter"\nexecutable = true\nruntimes = ["litert"]\n')


def test_a_users_own_file(tmp_path):
    table = load_recipes(_write(tmp_path, GOOD))
    assert table.names() == ("w8",) and table.get("w8").runtimes == ("litert",)
    assert table.source == str(tmp_path / "mine.toml")


@pytest.mark.parametrize(
    "body, message",
    [
        (GOOD + 'colour = "red"\n', r"mine\.toml:w8\.colour: unknown key"),
        (GOOD.replace("weights_bits = 8", "weights_bits = 3"), r"mine\.toml:w8\.weights_bits: 3 is not one of"),
        (GOOD.replace("weights_bits = 8", 'weights_bits = "8"'), r"mine\.toml:w8\.weights_bits: expected an integer"),
        (GOOD.replace('activations = "int8"', 'activations = "int12"'), r"w8\.activations: 'int12' is not one of"),
        (GOOD.replace('"per-channel"', '"blockwise"'), r"w8\.block_size: blockwise needs block_size"),
        (GOOD.replace("executable = true", "executable = false"), r"w8\.executable: only simulated"),
        (GOOD.replace('["litert"]', '["coreml"]'), r"w8\.runtimes: 'coreml' is not one of"),
        (GOOD.replace('quantizer = "tflite-converter"\n', ""), r"mine\.toml:w8\.quantizer: missing"),
        (GOOD + GOOD, r"mine\.toml:w8\.name: recipe 'w8' is defined twice"),
        (GOOD.replace('name = "w8"', 'name = "W 8"'), r"mine\.toml:recipe\[0\]\.name: expected a recipe name"),
        (GOOD.replace("weights_bits = 8", "weights_bits = 4"), r"w8\.quantizer: TensorFlow's converter makes"),
        ("[[recipe]\nname=", r"mine\.toml: not valid TOML"),
        ('title = "x"\n', r"mine\.toml:title: unknown key"),
        ("", r"mine\.toml:recipe: no \[\[recipe\]\] tables"),
    ],
    ids=["unknown-key", "bits", "bits-type", "activations", "block", "executable", "runtime", "missing",
         "twice", "name", "converter-int4", "toml", "top-key", "empty"],
)
def test_bad_recipe_files_name_file_and_key(tmp_path, body, message, ledger):
    with pytest.raises(RecipeError, match=message) as err:
        load_recipes(_write(tmp_path, body))
    assert "\n" not in str(err.value)
    ledger("bad_input", "bad recipe file")


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(RecipeError) as err:
        SHIPPED.get("int3")
    assert str(err.value) == "unknown recipe 'int3'; choose one of " + ", ".join(SHIPPED.names())


def test_missing_and_binary_recipe_files(tmp_path):
    with pytest.raises(RecipeError, match=r"nope\.toml: no such recipe file"):
        load_recipes(tmp_path / "nope.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RecipeError, match=r"bin\.toml: not UTF-8 text"):
        load_recipes(tmp_path / "bin.toml")
    with pytest.raises(RecipeError, match="is a directory"):
        load_recipes(tmp_path)
    os.mkfifo(tmp_path / "fifo.toml")
    with pytest.raises(RecipeError, match="fifo.toml is not a regular file"):
        load_recipes(tmp_path / "fifo.toml")


# ---------------------------------------------------------------- every recipe made from one export + calibration


@pytest.fixture(scope="module")
def stages(digits_keras, calib_npy, digits_eval_npz, tmp_path_factory):
    """Float export and calibration once; every executable recipe quantized from them and written."""
    from edgeq.calibration import DataOptions, load_dataset
    from edgeq.convert import calibrate, export_float, load_model, quantize

    work = tmp_path_factory.mktemp("recipes")
    loaded = load_model(digits_keras)
    float_model = export_float(loaded, work)
    calib = load_dataset(calib_npy, loaded.inputs, DataOptions(samples=100), role="calibration")
    evaluation = load_dataset(digits_eval_npz, loaded.inputs, DataOptions(), role="evaluation")
    calibration = calibrate(float_model, calib)
    models = {}
    for name in EXECUTABLE:
        q = quantize(float_model, calibration, SHIPPED.get(name))
        path = work / f"{name}.tflite"
        path.write_bytes(q.content)
        models[name] = (q, path)
    return {"loaded": loaded, "float": float_model, "calibration": calibration, "calib": calib,
            "eval": evaluation, "models": models, "work": work}


@pytest.mark.slow
def test_default_int8_from_recorded_ranges_equals_tflite_converter(stages):
    """quantize() from the one calibration gives TFLiteConverter.convert()'s numbers, bit for bit."""
    import tensorflow as tf

    from edgeq.convert.interpreter import run_all

    calib = stages["calib"]
    conv = tf.lite.TFLiteConverter.from_saved_model(stages["float"].saved_model_dir)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    conv.representative_dataset = lambda: (calib.sample(i) for i in range(len(calib)))
    reference = conv.convert()
    for name in ("int8",):
        ours = stages["models"][name][0].content
        a = run_all(ours, stages["eval"], None, "ours")
        b = run_all(reference, stages["eval"], None, "tf")
        assert all(np.array_equal(a[k], b[k]) for k in a)
    from edgeq.tflite_file import parse_tflite

    ours_t = parse_tflite(stages["models"]["int8"][0].content).main.tensors
    ref_t = parse_tflite(reference).main.tensors
    assert [(t.dtype, t.shape, t.quantization) for t in ours_t] == [(t.dtype, t.shape, t.quantization) for t in ref_t]


@pytest.mark.slow
def test_recipes_are_what_they_say(stages):
    from edgeq.tflite_file import parse_tflite

    dtypes = {name: parse_tflite(q.content).tensor_dtypes() for name, (q, _) in stages["models"].items()}
    assert "float16" in dtypes["fp16"] and dtypes["fp32"] <= {"float32", "int32"}
    assert dtypes["int8"] <= {"int8", "int32"} and "int16" in dtypes["int16x8"]
    assert "int4" in dtypes["int4-dynamic"] and "int4" in dtypes["int4w-int8a"] and "int8" in dtypes["int4w-int8a"]
    assert "int2" in dtypes["int2-dynamic-b32"]
    sizes = {name: q.size_bytes for name, (q, _) in stages["models"].items()}
    assert sizes["int4-dynamic"] < sizes["dynamic-int8"] < sizes["fp16"] < sizes["fp32"]


@pytest.mark.slow
def test_static_recipes_reuse_one_calibration(stages, monkeypatch):
    """Quantizing again from the Calibration runs no sample through any calibrator."""
    from tensorflow.lite.python.optimize import calibrator as tf_calibrator

    import edgeq.convert.quantizers as equant
    from edgeq.convert import quantize

    calls = []
    monkeypatch.setattr(tf_calibrator.Calibrator, "calibrate",
                        lambda *a, **k: calls.append("tf") or pytest.fail("TF calibrator ran again"))
    original = equant.litert_quantize

    def spy(content, recipe, calib=None, cache=None):  # type: ignore[no-untyped-def]
        assert cache is not None and (not recipe.needs_calibration or "qsvs" in cache)
        return original(content, recipe, calib, cache)

    monkeypatch.setattr(equant, "litert_quantize", spy)
    for name in ("int8", "int8-per-tensor", "int16x8", "int4w-int8a"):
        quantize(stages["float"], stages["calibration"], SHIPPED.get(name))
    assert calls == []


@pytest.mark.slow
def test_simulated_levels_are_measured_never_written(stages):
    from edgeq.convert import quantize
    from edgeq.convert import simulate

    before = sorted(p.name for p in stages["work"].iterdir())
    results = {name: simulate(stages["float"], SHIPPED.get(name), stages["eval"])
               for name in ("sim-int2-mcu", "sim-kmeans16", "sim-kmeans4")}
    assert sorted(p.name for p in stages["work"].iterdir()) == before
    k16, k4, two = results["sim-kmeans16"], results["sim-kmeans4"], results["sim-int2-mcu"]
    assert k16.weights == 3 and k16.float_weight_bytes == k4.float_weight_bytes
    # 16 clusters: 4-bit codes; 4 clusters: 2-bit codes (plus their codebooks).
    assert k4.compressed_weight_bytes < k16.compressed_weight_bytes < k16.float_weight_bytes / 6
    assert k16.accuracy >= k4.accuracy - 0.02 and k16.accuracy > k16.accuracy_float - 0.05
    assert two.accuracy < k16.accuracy and 0.0 <= two.accuracy <= 1.0
    assert not any(r.executable for r in results.values())
    with pytest.raises(RecipeError, match="never written as a .tflite"):
        quantize(stages["float"], stages["calibration"], SHIPPED.get("sim-kmeans4"))


# ---------------------------------------------------------------- which runtime runs what (measured)


_CHILD = r'''
import json, sys
import numpy as np
runtime, feed_path = sys.argv[1], sys.argv[2]
feed = np.load(feed_path).astype(np.float32)
def qparams(d):
    if "quantization" in d:
        return d["quantization"]
    q = d["quantization_parameters"]  # TFLite Micro's details
    return float(q["scales"][0]), int(q["zero_points"][0])
def quant(x, d):
    dt = np.dtype(d["dtype"])
    if dt.kind in "iu":
        scale, zp = qparams(d)
        info = np.iinfo(dt)
        return np.clip(np.round(x / scale + zp), info.min, info.max).astype(dt)
    return x.astype(dt)
def dequant(y, d):
    if np.dtype(d["dtype"]).kind in "iu":
        scale, zp = qparams(d)
        return (y.astype(np.float32) - zp) * scale
    return y.astype(np.float32)
for path in sys.argv[3:]:
    doc = {"path": path}
    try:
        data = open(path, "rb").read()
        if runtime == "tflm":
            from tflite_micro.python.tflite_micro import runtime as tflm
            it = tflm.Interpreter.from_bytes(data, arena_size=1 << 20)
            d = it.get_input_details(0)
            it.set_input(quant(feed, d), 0)
            it.invoke()
            out = dequant(it.get_output(0), it.get_output_details(0))
        else:
            if runtime == "tflite-runtime":
                from tflite_runtime.interpreter import Interpreter
                kw = {}
            else:
                from ai_edge_litert.interpreter import Interpreter, OpResolverType
                kw = {} if runtime == "litert" else {
                    "experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
            it = Interpreter(model_content=data, **kw)
            it.allocate_tensors()
            if runtime == "litert":
                ops = it._get_ops_details()
                doc["ops"] = [[int(o["index"]), o["op_name"], [int(t) for t in o["inputs"]],
                               [int(t) for t in o["outputs"]]] for o in ops]
            d = it.get_input_details()[0]
            it.set_tensor(d["index"], quant(feed, d))
            it.invoke()
            o = it.get_output_details()[0]
            out = dequant(it.get_tensor(o["index"]), o)
        doc["ok"] = True
        doc["out"] = np.asarray(out, dtype=np.float64).ravel().tolist()
    except Exception as exc:
        doc["ok"] = False
        doc["error"] = (type(exc).__name__ + ": " + str(exc))[:400]
    print(json.dumps(doc), flush=True)
'''


def _run_child(python: str, runtime: str, feed: Path, paths: list[Path], work: Path) -> dict[str, dict]:
    """Run every model on ``runtime`` in a child; a crash (signal) only costs the model that caused it."""
    script = work / "recipe_child.py"
    script.write_text(_CHILD)
    results: dict[str, dict] = {}
    todo = [str(p) for p in paths]
    while todo:
        proc = subprocess.run([python, str(script), runtime, str(feed), *todo], capture_output=True, text=True,
                              timeout=300, cwd=tempfile.gettempdir())
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                doc = json.loads(line)
                results[doc["path"]] = doc
        done = [p for p in todo if p in results]
        rest = todo[len(done):]
        if proc.returncode != 0 and rest:
            results[rest[0]] = {"ok": False, "error": f"crashed (exit {proc.returncode}): {proc.stderr[-300:]}"}
            rest = rest[1:]
        todo = rest
    return {Path(p).stem: doc for p, doc in results.items()}


@pytest.fixture(scope="module")
def measured(stages, digits, device_python):
    """{runtime: {recipe: child document}} for litert, litert-builtin, tflite-runtime and tflm."""
    work = stages["work"]
    feed = work / "feed.npy"
    np.save(feed, digits["x_test"][:1])
    paths = [path for _, path in stages["models"].values()]
    out = {}
    for runtime, python in (("litert", sys.executable), ("litert-builtin", sys.executable),
                            ("tflite-runtime", device_python), ("tflm", sys.executable)):
        out[runtime] = _run_child(python, runtime, feed, paths, work)
    evidence = os.environ.get("EDGEQ_RECIPE_EVIDENCE")  # a file to keep what was measured, for a person
    if evidence:
        Path(evidence).write_text(json.dumps(out, indent=1))
    return out


def _runs(measured: dict, runtime: str, recipe: str) -> tuple[bool, str]:
    """Does ``runtime`` run ``recipe`` and agree with LiteRT's built-in kernels on the same input?"""
    ref = measured["litert-builtin"][recipe]
    if runtime == "litert":
        # LiteRT runs the model if its default (XNNPACK) or its built-in kernels do; edgeq's own runs
        # fall back to the built-in kernels when the default delegate refuses a model.
        doc = measured["litert"][recipe] if measured["litert"][recipe]["ok"] else ref
    else:
        doc = measured[runtime][recipe]
    if not doc["ok"]:
        return False, doc["error"]
    if not ref["ok"]:
        return False, "LiteRT's built-in kernels could not run it: " + ref["error"]
    diff = float(np.max(np.abs(np.array(doc["out"]) - np.array(ref["out"]))))
    # Softmax probabilities; one int8 output step is 1/256.
    return diff <= 0.02, f"max |difference| from LiteRT built-in kernels {diff:.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", EXECUTABLE)
def test_runtime_claims(measured, recipe):
    claims = SHIPPED.get(recipe).runtimes
    found = {rt: _runs(measured, rt, recipe) for rt in RUNTIMES}
    for rt, (ok, why) in found.items():
        assert (rt in claims) == ok, f"{recipe} on {rt}: table says {rt in claims}, measured {ok} ({why})"


def _xnnpack_takes_compute(doc: dict) -> bool:
    """Did LiteRT's default delegate (XNNPACK) take every CONV/DEPTHWISE/FULLY_CONNECTED node?"""
    from edgeq._device.measure import delegated_nodes

    if not doc["ok"]:
        return False
    ops = [{"index": i, "op_name": name, "inputs": ins, "outputs": outs} for i, name, ins, outs in doc["ops"]]
    taken = set(delegated_nodes(ops)["delegated"])
    compute = [o["index"] for o in ops
               if o["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    return bool(compute) and all(i in taken for i in compute)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", EXECUTABLE)
def test_xnnpack_claims(measured, recipe):
    claimed = "xnnpack" in SHIPPED.get(recipe).accelerated_on
    got = _xnnpack_takes_compute(measured["litert"][recipe])
    assert claimed == got, f"{recipe}: table says XNNPACK accelerates it: {claimed}; measured: {got}"


# ---------------------------------------------------------------- the same claims on the emulated aarch64 Pi


@pytest.fixture(scope="module")
def emulated_pi_measured(stages, digits):
    """{runtime: {recipe: doc}} measured on the emulated Raspberry Pi 4 (qemu cortex-a72, bookworm):
    ai-edge-litert 2.3 and tflite-runtime 2.14, each model run in the device's own Python."""
    import io
    import tarfile

    from tests.devices.conftest import device_facts, start_devices, stop_devices

    index = 3  # a device of its own: the deploy tests use 0 and 1
    started = start_devices([index])
    try:
        pi = device_facts(index)
        work = stages["work"]
        np.save(work / "feed.npy", digits["x_test"][:1])
        (work / "recipe_child.py").write_text(_CHILD)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for p in [work / "feed.npy", work / "recipe_child.py", *(path for _, path in stages["models"].values())]:
                tar.add(p, arcname=p.name)
        names = " ".join(path.name for _, path in stages["models"].values())
        out: dict[str, dict] = {}
        for runtime, python, as_runtime in (("litert", pi.python_litert, "litert"),
                                             ("litert-builtin", pi.python_litert, "litert-builtin"),
                                             ("tflite-runtime", pi.python_tflite, "tflite-runtime")):
            # One model per child, so a runtime crash costs only that model's figure.
            remote = (f"d=$(mktemp -d) && tar -x -C $d && cd $d && for m in {names}; do "
                      f"{python} recipe_child.py {as_runtime} feed.npy $m "
                      f"|| echo '{{\"path\": \"'$m'\", \"ok\": false, \"error\": \"crashed\"}}'; done; rm -rf $d")
            proc = subprocess.run(
                ["ssh", "-i", str(pi.key), "-o", f"UserKnownHostsFile={pi.known_hosts}",
                 "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-p", str(pi.port),
                 f"{pi.user}@{pi.addr}", remote],
                input=buf.getvalue(), capture_output=True, timeout=900)
            docs = [json.loads(line) for line in proc.stdout.decode().splitlines() if line.startswith("{")]
            assert docs, proc.stderr.decode()[-500:]
            out[runtime] = {Path(d["path"]).stem: d for d in docs}
        evidence = os.environ.get("EDGEQ_RECIPE_EVIDENCE")
        if evidence:
            Path(evidence).with_suffix(".arm64.json").write_text(json.dumps(out, indent=1))
        yield out
    finally:
        stop_devices(started)


@pytest.mark.slow
@pytest.mark.arm64
@pytest.mark.parametrize("recipe", EXECUTABLE)
def test_runtime_claims_on_the_emulated_pi(emulated_pi_measured, recipe):
    """The x86 claims hold on aarch64 too (LiteRT and tflite-runtime; TFLite Micro is not on a Pi)."""
    claims = SHIPPED.get(recipe).runtimes
    for rt in ("litert", "tflite-runtime"):
        ok, why = _runs(emulated_pi_measured, rt, recipe)
        assert (rt in claims) == ok, f"{recipe} on aarch64 {rt}: table says {rt in claims}, measured {ok} ({why})"
