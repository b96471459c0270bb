"""Load, time and evaluate a model (``run``) and capture its intermediate tensors (``layers``), each under
its own time cap; delegate/XNNPACK reporting and peak memory. Part of edgeq's on-device runner (see runner.py)."""

# A device module (standard library + numpy): on the device ``protocol.standalone`` installs it as
# ``edgeq_<name>`` ahead of the runner, after sys.path is cleaned; it must import nothing else before that.
import sys

import base64
import os
import platform
import tempfile
import time

try:
    import edgeq_protocol as protocol  # sent ahead of the runner (protocol.standalone) or set up by the collection
except ImportError:
    try:
        from edgeq._device import protocol  # imported as a module of edgeq
    except ImportError:
        import protocol  # run as a script beside it (deploy/, tests)

facts = protocol.device_module("facts")
tensorio = protocol.device_module("tensorio")

RunnerError = protocol.RunnerError


# ----------------------------------------------------------------------- run

class _CaptureStderr(object):
    """Capture C-level stderr (fd 2), where the runtime logs which delegate it applied."""

    def __enter__(self):
        self.text = ""
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            self._file = tempfile.TemporaryFile()
            os.dup2(self._file.fileno(), 2)
        except (OSError, IOError):
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is None:
            return False
        try:
            sys.stderr.flush()
        except Exception:
            pass
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read(65536).decode("utf-8", "replace")
        self._file.close()
        return False


def run(args):
    import numpy as np

    name, Interpreter, OpResolverType, version, problems = facts.find_runtime(args.runtime)
    if name is None:
        raise RunnerError("no TFLite runtime is importable (%s)" % "; ".join(
            "%s: %s" % kv for kv in sorted(problems.items())), "no_runtime")
    kwargs = {"model_path": args.model}
    if args.threads is not None and args.threads > 0:
        kwargs["num_threads"] = args.threads
    if args.no_xnnpack:
        if OpResolverType is None:
            raise RunnerError("%s %s cannot disable XNNPACK (no OpResolverType)" % (name, version), "usage")
        kwargs["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES

    with _CaptureStderr() as cap:
        t0 = time.perf_counter()
        try:
            interp = Interpreter(**kwargs)
        except Exception as exc:
            raise RunnerError("the runtime could not load the model: %s" % (str(exc).strip().splitlines() or [""])[0],
                              "model")
        load_s = time.perf_counter() - t0
        inputs = interp.get_input_details()
        in_names, _order = tensorio.io_names(interp, inputs, "inputs")

        # Eval arrays are matched to inputs by name; a dynamic input takes its shape from them (or --input-shape).
        bound = data = None
        if args.eval:
            data = tensorio.load_eval(np, args.eval)
            bound = tensorio.bind_inputs(inputs, in_names, data, args.eval)
            shapes = dict((int(d["index"]), [1] + [int(s) for s in arr.shape[1:]]) for d, arr in bound)
            resized = tensorio.resize_inputs(interp, inputs, in_names, shapes, "the eval data")
        else:
            resized = tensorio.resize_inputs(interp, inputs, in_names,
                                             tensorio.parse_shapes(getattr(args, "input_shape", None), inputs,
                                                                   in_names),
                                             "--input-shape")
        # Allocated once the inputs have their shapes (a dynamic input cannot be allocated before).
        t0 = time.perf_counter()
        try:
            interp.allocate_tensors()
        except Exception as exc:
            raise RunnerError("the runtime could not load the model%s: %s" % (
                " at input shape " + ", ".join("%s %s" % (r["input"], "x".join(str(n) for n in r["shape"]))
                                               for r in resized) if resized else "", facts.first_line(exc)), "model")
        load_s += time.perf_counter() - t0
        if resized:
            inputs = interp.get_input_details()
            if bound is not None:
                by_index = dict((int(d["index"]), d) for d in inputs)
                bound = [(by_index[int(d["index"])], arr) for d, arr in bound]
        out_names, outputs = tensorio.io_names(interp, interp.get_output_details(), "outputs")

        rng = np.random.RandomState(0)
        tensorio.reset_state(interp)
        if bound is not None:
            feed = [tensorio.quantize(np, arr[:1], d, "model input %r" % in_names[int(d["index"])][0])
                    for d, arr in bound]
            inputs_fed = [d for d, _arr in bound]
        else:
            feed = [tensorio.random_input(np, rng, d) for d in inputs]
            inputs_fed = inputs
        for d, value in zip(inputs_fed, feed):
            interp.set_tensor(d["index"], value)
        t0 = time.perf_counter()
        _invoke(interp, "the first inference")
        first_s = time.perf_counter() - t0
        delegate = _delegation(interp, None if args.no_xnnpack else "xnnpack")
    log = cap.text
    xnnpack_active = ("XNNPACK delegate" in log) if log else None

    samples = []
    if not args.eval_only:
        # Warm-up like benchmark_model: at least N runs and at least min_warmup seconds.
        start = time.perf_counter()
        n = 0
        while n < args.warmup or (time.perf_counter() - start) < args.min_warmup_seconds:
            _invoke(interp, "a warm-up inference")
            n += 1
        warmup_runs = n
        invoke = interp.invoke
        clock = time.perf_counter
        try:
            invoke()  # one checked call; the timed loop below stays lean
        except Exception as exc:
            raise RunnerError("an inference failed: %s" % facts.first_line(exc), "model")
        append = samples.append
        start = clock()
        deadline_max = start + args.max_seconds
        while True:
            t0 = clock()
            try:
                invoke()
            except Exception as exc:
                raise RunnerError("an inference failed after %d timed runs: %s" % (len(samples), facts.first_line(exc)),
                                  "model")
            t1 = clock()
            append(t1 - t0)
            if len(samples) >= args.runs and (t1 - start) >= args.min_seconds:
                break
            # Tiny models would otherwise record 10^5+ samples per second.
            if len(samples) >= max(args.max_runs, args.runs) or (t1 >= deadline_max and samples):
                break
    else:
        warmup_runs = 0

    result = {
        "ok": True,
        "mode": "run",
        "runner_version": facts.RUNNER_VERSION,
        "runtime": {"name": name, "version": version, "threads": args.threads,
                    "xnnpack": not args.no_xnnpack, "xnnpack_active": xnnpack_active},
        "python": platform.python_version(),
        "numpy": np.__version__,
        "inputs": [{"name": d.get("name"), "shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                    "quantization": [float(d["quantization"][0]), int(d["quantization"][1])]} for d in inputs],
        "outputs": [{"name": d.get("name"), "shape": [int(s) for s in d["shape"]], "dtype": np.dtype(d["dtype"]).name,
                     "quantization": [float(d["quantization"][0]), int(d["quantization"][1])]} for d in outputs],
        "load_ms": load_s * 1e3,
        "first_inference_ms": first_s * 1e3,
        "warmup_runs": warmup_runs,
        "samples_ms": [round(s * 1e3, 5) for s in samples],
        "runtime_log": log[-4000:],
        "delegate": delegate,
    }

    if resized:
        result["resized"] = resized
    if bound is not None:
        reload = tensorio.fresh_interpreter(Interpreter, kwargs, bound) if tensorio.resource_variables(interp) else None
        result["eval"] = _evaluate(np, interp, bound, outputs, out_names, in_names, data.get("y"), args.max_outputs,
                                   args.max_eval_seconds, reload)
    result["peak_rss_bytes"] = _peak_rss()
    return result


def delegated_nodes(ops):
    """Which of the model's nodes a delegate (LiteRT's default: XNNPACK) took, from the interpreter's op details.

    After the first inference (or ``allocate_tensors``) the details list the
    model's own nodes, then one ``DELEGATE`` node per partition the delegate
    took, whose inputs and outputs are the partition's boundary tensors. A node
    belongs to a partition when it is reached walking back from the partition's
    outputs without crossing its inputs. The host's check (``edgeq.micro``)
    counts with this function too.
    """
    own = [o for o in ops if o.get("op_name") != "DELEGATE"]
    partitions = [o for o in ops if o.get("op_name") == "DELEGATE"]
    producer = {}
    by_index = {}
    for o in own:
        by_index[int(o["index"])] = o
        for t in o["outputs"]:
            producer[int(t)] = int(o["index"])
    taken = set()
    for part in partitions:
        boundary = set(int(t) for t in part["inputs"])
        stack = [int(t) for t in part["outputs"]]
        seen = set()
        while stack:
            t = stack.pop()
            if t in seen or t in boundary or t not in producer:
                continue
            seen.add(t)
            node = producer[t]
            if node not in taken:
                taken.add(node)
                stack.extend(int(x) for x in by_index[node]["inputs"] if int(x) >= 0)
    return {"nodes": len(own), "partitions": len(partitions), "delegated": sorted(taken),
            "not_delegated": [[int(o["index"]), str(o["op_name"])] for o in own if int(o["index"]) not in taken]}


def _delegation(interp, requested):
    """What a delegate really took (``delegated_nodes``). A runtime that does not list its nodes (no
    ``_get_ops_details``) gives ``applied: null``: unknown, not false."""
    doc = {"requested": requested, "applied": None, "delegated_nodes": None, "nodes": None, "partitions": None}
    get = getattr(interp, "_get_ops_details", None)
    if get is None:
        return doc
    try:
        found = delegated_nodes(get())
    except Exception:  # a runtime whose op details differ: unknown, never a failed run
        return doc
    doc.update({"applied": bool(found["delegated"]), "delegated_nodes": len(found["delegated"]),
                "nodes": found["nodes"], "partitions": found["partitions"]})
    return doc


def _invoke(interp, what):
    try:
        interp.invoke()
    except Exception as exc:
        raise RunnerError("%s failed: %s" % (what, facts.first_line(exc)), "model")


def _legacy_metrics(np, ev, preds, y):
    """Accuracy / MAE of a single-output model against labels 'y' (what the rollout gate reads on the device)."""
    if y is None or len(y) != len(preds):
        return
    flat = preds.reshape(len(preds), -1)
    if y.dtype.kind in "iub" and flat.shape[1] > 1 and y.ndim == 1:
        ev["task"] = "classification"
        ev["accuracy"] = float(np.mean(np.argmax(flat, axis=1) == y.astype(np.int64)))
    elif y.ndim == 2 and y.shape[1] == flat.shape[1] and flat.shape[1] > 1 and y.dtype.kind in "iub":
        ev["task"] = "classification"
        ev["accuracy"] = float(np.mean(np.argmax(flat, axis=1) == np.argmax(y, axis=1)))
    elif y.size == flat.size:
        ev["task"] = "regression"
        ev["mae"] = float(np.mean(np.abs(flat - y.reshape(len(y), -1).astype(np.float32))))


def _evaluate(np, interp, bound, outputs, names, in_names, y, max_outputs, max_seconds=None, reload=None):
    """Run every eval sample (variable tensors reset before each, or with ``reload`` a fresh interpreter for
    each: samples are independent) and return every output, dequantized, for as many samples as
    ``max_outputs`` values allow; the host judges them."""
    count = len(bound[0][1])
    kept = [[] for _ in outputs]
    shapes = [None for _ in outputs]
    first = []
    rows = None
    reset = None
    t0 = time.perf_counter()
    for i in range(count):
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            raise RunnerError("evaluation took longer than its cap of %g s (%d of %d samples done); use fewer "
                              "eval samples or raise the cap" % (max_seconds, i, count), "eval_timeout")
        if reload is not None:
            try:
                interp = reload()
            except Exception as exc:
                raise RunnerError("reloading the model for eval sample %d failed: %s" % (i, facts.first_line(exc)),
                                  "model")
        reset = tensorio.reset_state(interp)
        for d, arr in bound:
            interp.set_tensor(d["index"], tensorio.quantize(np, arr[i:i + 1], d,
                                                            "model input %r" % in_names[int(d["index"])][0]))
        _invoke(interp, "inference on eval sample %d" % i)
        values = [tensorio.dequantize(np, interp.get_tensor(o["index"]), o)[0] for o in outputs]
        if rows is None:
            # Bounded output: at most max_outputs values in all (the host keeps only so much of stdout).
            shapes = [v.shape for v in values]
            rows = max(0, max_outputs // max(1, sum(max(1, v.size) for v in values)))
        if i < rows:
            for j, v in enumerate(values):
                kept[j].append(v)
        if len(outputs) == 1:
            first.append(values[0])
    elapsed = time.perf_counter() - t0
    ev = {"samples": int(count), "seconds": elapsed, "accuracy": None, "mae": None, "task": None,
          "state_reset": reset is not None, "state_reload": reload is not None, "rows": int(min(rows or 0, count)),
          "per_output": []}
    if len(outputs) == 1 and first:
        _legacy_metrics(np, ev, np.stack(first), y)
    for j, o in enumerate(outputs):
        arr = np.stack(kept[j]) if kept[j] else np.zeros((0,) + tuple(shapes[j] or ()), np.float32)
        ev["per_output"].append({"name": names[int(o["index"])][0], "tensor": str(o.get("name") or "")[:1024],
                                 "outputs": tensorio.encode_array(np, arr)})
    if ev["rows"] < count:
        ev["outputs_truncated"] = True
    return ev


LAYER_DTYPES = ("int8", "uint8", "int16", "int32", "int64", "float16", "float32", "bool")


def layers(args):
    """Every requested intermediate tensor for the first --count eval inputs (raw values, bounded)."""
    import numpy as np

    name, Interpreter, OpResolverType, version, problems = facts.find_runtime(args.runtime)
    if name is None:
        raise RunnerError("no TFLite runtime is importable (%s)" % "; ".join(
            "%s: %s" % kv for kv in sorted(problems.items())), "no_runtime")
    kwargs = {"model_path": args.model, "experimental_preserve_all_tensors": True}
    # Intermediate tensors exist only on the runtime's own kernels (a delegate fuses them away).
    if OpResolverType is not None:
        kwargs["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    with _CaptureStderr():
        try:
            interp = Interpreter(**kwargs)
        except TypeError:
            raise RunnerError("%s %s cannot keep intermediate tensors" % (name, version), "usage")
        except Exception as exc:
            raise RunnerError("the runtime could not load the model: %s" % facts.first_line(exc), "model")
        inputs = interp.get_input_details()
        in_names, _order = tensorio.io_names(interp, inputs, "inputs")
        bound = tensorio.bind_inputs(inputs, in_names, tensorio.load_eval(np, args.eval), args.eval)
        shapes = dict((int(d["index"]), [1] + [int(s) for s in arr.shape[1:]]) for d, arr in bound)
        resized = tensorio.resize_inputs(interp, inputs, in_names, shapes, "the eval data")
        try:
            interp.allocate_tensors()
        except Exception as exc:
            raise RunnerError("the runtime could not load the model: %s" % facts.first_line(exc), "model")
    if resized:
        by_index = dict((int(d["index"]), d) for d in interp.get_input_details())
        bound = [(by_index[int(d["index"])], arr) for d, arr in bound]
    count = max(0, min(args.count, len(bound[0][1])))
    details = dict((d["index"], d) for d in interp.get_tensor_details())
    known = set(details)
    ops = []
    get_ops = getattr(interp, "_get_ops_details", None)
    if get_ops is not None:
        for op in get_ops()[:100000]:
            ops.append({"index": int(op["index"]), "op": str(op["op_name"])[:64],
                        "outputs": [int(t) for t in op["outputs"] if int(t) >= 0][:64]})
    if args.tensors:
        try:
            wanted = [int(t) for t in args.tensors.split(",") if t.strip()]
        except ValueError:
            raise RunnerError("--tensors is not a list of tensor indices", "usage")
    else:
        wanted = sorted(known)
    wanted = [t for t in wanted if t in known]
    values = dict((t, []) for t in wanted)
    total = 0
    for i in range(count):
        tensorio.reset_state(interp)
        for d, arr in bound:
            interp.set_tensor(d["index"], tensorio.quantize(np, arr[i:i + 1], d,
                                                            "model input %r" % in_names[int(d["index"])][0]))
        _invoke(interp, "inference on eval sample %d" % i)
        for t in wanted:
            try:
                v = interp.get_tensor(t)
            except ValueError:
                continue  # a tensor without data (e.g. an unused optional input)
            if v.dtype.name not in LAYER_DTYPES:
                continue
            total += int(v.nbytes)
            if total > args.max_bytes:
                raise RunnerError("the intermediate tensors of %d inputs hold more than %d bytes; use fewer "
                                  "inputs" % (count, args.max_bytes), "limit")
            values[t].append(np.array(v, copy=True))
    tensors = []
    for t in wanted:
        if len(values[t]) != count or not count:
            continue
        arr = np.stack(values[t])
        arr = arr.astype(arr.dtype.newbyteorder("<"))
        d = details[t]
        q = d.get("quantization") or (0.0, 0)
        tensors.append({"index": t, "name": str(d.get("name") or "")[:1024], "dtype": arr.dtype.name,
                        "shape": [int(n) for n in arr.shape],
                        "quantization": [float(q[0]), int(q[1])],
                        "b64": base64.b64encode(arr.tobytes()).decode("ascii")})
    return {"ok": True, "mode": "layers", "runner_version": facts.RUNNER_VERSION,
            "runtime": {"name": name, "version": version, "xnnpack": False}, "samples": count, "tensors": tensors,
            "ops": ops}


def _peak_rss():
    # Linux carries ru_maxrss across exec, so a runner started by a large process (a local device
    # under an edgeq holding TensorFlow) would report its parent's peak. VmHWM is this process's own.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(rss if sys.platform == "darwin" else rss * 1024)
