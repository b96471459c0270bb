"""Tensors in and out of an interpreter: eval data (bounded .npz/.npy reading that checks declared sizes
before numpy loads anything), input binding by name, shapes and resizing, (de)quantization, state reset.
Part of edgeq's on-device runner (see runner.py)."""

# A device module (standard library + numpy): on the device ``protocol.standalone`` installs it as
# ``edgeq_<name>`` ahead of the runner, after sys.path is cleaned; it must import nothing else before that.
import base64
import os

try:
    import edgeq_protocol as protocol  # sent ahead of the runner (protocol.standalone) or set up by the collection
except ImportError:
    try:
        from edgeq._device import protocol  # imported as a module of edgeq
    except ImportError:
        import protocol  # run as a script beside it (deploy/, tests)

facts = protocol.device_module("facts")

RunnerError = protocol.RunnerError


NPZ_MAX_BYTES = 1 << 30  # what an eval .npz may declare in total once loaded (documented in the README)
NPZ_BOMB_FLOOR = 64 << 20  # above this, an array packed more than NPZ_MAX_RATIO times is a bomb: real data
NPZ_MAX_RATIO = 100        # (images, features) compresses a few times, zeros a thousand times


def _npy_declared(f, where, not_npy="is not an .npy array"):
    """Bytes the .npy header at the start of the file object ``f`` declares (no data is read or allocated);
    ``RunnerError`` ("data") naming ``where`` when it is not a plain numeric array. Standard library only."""
    import ast
    import re
    import struct

    magic = f.read(8)
    if len(magic) < 8 or magic[:6] != b"\x93NUMPY" or magic[6:7] not in (b"\x01", b"\x02", b"\x03"):
        raise RunnerError("eval data %s %s" % (where, not_npy), "data")
    fmt = "<H" if magic[6:7] == b"\x01" else "<I"
    size = struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]
    if size > 10000:
        raise RunnerError("eval data %s has a %d-byte header" % (where, size), "data")
    header = ast.literal_eval(f.read(size).decode("latin1"))
    descr = header.get("descr") if isinstance(header, dict) else None
    shape = header.get("shape") if isinstance(header, dict) else None
    m = re.match(r"^[<>|=]?([iufb])(\d+)$", descr) if isinstance(descr, str) else None
    if (m is None or not isinstance(shape, tuple)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise RunnerError("eval data %s is not a plain numeric array" % where, "data")
    declared = int(m.group(2))
    for d in shape:
        declared *= d
    return declared


def _npz_declared_bytes(path, limit=NPZ_MAX_BYTES):
    """Bytes the arrays of the .npz at ``path`` declare, read from each member's .npy header (no data is
    decompressed); ``RunnerError`` ("data") naming the file, the member and the sizes when a member declares
    more than it holds (a zip bomb) or the total passes ``limit``. Standard library only."""
    import zipfile

    total = 0
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with z.open(info) as member:
                    declared = _npy_declared(member, "%s member %s" % (path, info.filename))
                if declared > info.file_size or (declared > NPZ_BOMB_FLOOR
                                                 and declared > NPZ_MAX_RATIO * max(info.compress_size, 1)):
                    raise RunnerError("eval data %s: member %s declares %d bytes from %d compressed (%d in the "
                                      "archive's directory): a zip bomb or a damaged file"
                                      % (path, info.filename, declared, info.compress_size, info.file_size), "data")
                total += declared
                if total > limit:
                    raise RunnerError("eval data %s: its arrays declare %d bytes by member %s, more than the limit "
                                      "of %d" % (path, total, info.filename, limit), "data")
    except RunnerError:
        raise
    except Exception as exc:  # a corrupt zip, a header that is not a literal
        raise RunnerError("cannot read eval data %s: %s" % (path, str(exc).splitlines()[0][:200] if str(exc) else
                                                            type(exc).__name__), "data")
    return total


def quantize(np, x, detail, what="the input"):
    """Eval values as the input tensor takes them: real values quantized into an int8/uint8/int16 tensor with a
    scale; anything else (token ids into an int32 tensor, floats into a float tensor) passed through unchanged."""
    dtype = np.dtype(detail["dtype"])
    scale, zero = detail.get("quantization", (0.0, 0))
    if dtype.kind in "iu" and scale and dtype.itemsize <= 2:
        info = np.iinfo(dtype)
        q = np.round(x.astype(np.float32) / np.float32(scale) + zero)
        return np.clip(q, info.min, info.max).astype(dtype)
    if dtype.kind in "iu" and x.dtype.kind in "iufb":
        # Integer ids are never scaled; they must fit the tensor's type exactly (no silent wrap or truncation).
        if x.dtype.kind == "f" and x.size and not np.all(np.isfinite(x) & (np.floor(x) == x)):
            raise RunnerError("%s takes integers (%s) but the eval data hold fractional values" % (what, dtype.name),
                              "data")
        info = np.iinfo(dtype)
        if x.size and (x.min() < info.min or x.max() > info.max):
            raise RunnerError("%s takes %s but the eval data hold values from %s to %s"
                              % (what, dtype.name, x.min(), x.max()), "data")
    return x.astype(dtype)


def dequantize(np, y, detail):
    scale, zero = detail.get("quantization", (0.0, 0))
    if y.dtype.kind in "iu" and scale:
        return (y.astype(np.float32) - np.float32(zero)) * np.float32(scale)
    return y.astype(np.float32)


def random_input(np, rng, detail):
    dtype = np.dtype(detail["dtype"])
    shape = tuple(int(d) for d in detail["shape"])
    scale = (detail.get("quantization") or (0.0, 0))[0]
    if dtype.kind in "iu" and not scale:
        # An integer input that is not quantized holds ids (token ids, indices): 0 is valid for every table;
        # a random -128..127 would be an out-of-range gather.
        return np.zeros(shape, dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.randint(max(info.min, -128), min(info.max, 127) + 1, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.randint(0, 2, size=shape).astype(dtype)
    return rng.random_sample(shape).astype(dtype)


def encode_array(np, array):
    array = np.ascontiguousarray(array, dtype=np.float32)
    return {"dtype": "float32", "shape": list(array.shape),
            "b64": base64.b64encode(array.astype("<f4").tobytes()).decode("ascii")}


def io_names(interp, details, kind):
    """``{tensor index: [names]}`` for the model's inputs or outputs (``kind``), the signature's name first, then
    the tensor's (without ``serving_default_`` and ``:0``), and the tensors in signature order where there is one."""
    try:
        sigs = interp._get_full_signature_list() or {}
    except Exception:  # a runtime without signatures
        sigs = {}
    sig = {}
    if len(sigs) == 1:
        for key, index in (list(sigs.values())[0].get(kind) or {}).items():
            sig[int(index)] = str(key)
    names = {}
    for d in details:
        raw = str(d.get("name") or "")
        short = raw.split(":")[0]
        if short.startswith("serving_default_"):
            short = short[len("serving_default_"):]
        found = []
        for n in (sig.get(int(d["index"])), short, raw):
            if n and n not in found:
                found.append(n)
        names[int(d["index"])] = found or ["tensor %d" % int(d["index"])]
    order = list(details)
    if sig and set(sig) == set(int(d["index"]) for d in details):
        position = dict((index, i) for i, index in enumerate(sig))
        order.sort(key=lambda d: position[int(d["index"])])
    return names, order


def _is_label(key):
    return key == "y" or key.startswith("y_")


def bind_inputs(inputs, names, data, path):
    """``[(detail, array)]`` in input order: each eval array matched to a model input by name (``x``, or the
    only array, for a single-input model); one-line errors for a missing, extra or mis-shaped array."""
    chosen = {}
    for d in inputs:
        for n in names[int(d["index"])]:
            if n in data:
                chosen[int(d["index"])] = n
                break
    if len(inputs) == 1 and not chosen:
        arrays = [k for k in data if not _is_label(k)]
        if "x" in data:
            chosen[int(inputs[0]["index"])] = "x"
        elif len(arrays) == 1:
            chosen[int(inputs[0]["index"])] = arrays[0]
    wanted = ", ".join(repr(names[int(d["index"])][0]) for d in inputs)
    missing = [names[int(d["index"])][0] for d in inputs if int(d["index"]) not in chosen]
    if missing:
        raise RunnerError("eval data %s have no array for model input %s (the model takes %s; the file holds %s): "
                          "name one array after each input (or 'x' for a single-input model), labels 'y'"
                          % (path, ", ".join(repr(m) for m in missing), wanted,
                             ", ".join(repr(k) for k in data) or "nothing"), "data")
    extra = [k for k in data if k not in chosen.values() and not _is_label(k)]
    if extra:
        raise RunnerError("eval data %s: array %r is no model input (the model takes %s; labels go in 'y')"
                          % (path, extra[0], wanted), "data")
    bound = []
    count = None
    for d in inputs:
        key = chosen[int(d["index"])]
        arr = data[key]
        label = names[int(d["index"])][0]
        if arr.ndim < 1 or arr.dtype.kind not in "iufb":
            raise RunnerError("eval array %r in %s is not a numeric array with samples on the first axis"
                              % (key, path), "data")
        if count is None:
            count = len(arr)
        elif len(arr) != count:
            raise RunnerError("eval arrays in %s hold different numbers of samples (%d and %d for %r)"
                              % (path, count, len(arr), key), "data")
        sig = [int(s) for s in d.get("shape_signature", d["shape"])][1:]
        got = [int(s) for s in arr.shape[1:]]
        if len(got) != len(sig) or any(w >= 0 and w != g for w, g in zip(sig, got)):
            raise RunnerError("eval array %r in %s has samples of shape %s but model input %r takes %s "
                              "(first axis = samples; -1 = any)" % (key, path, got, label, sig), "data")
        bound.append((d, arr))
    if not count:
        raise RunnerError("eval data %s hold no samples" % path, "data")
    return bound


def parse_shapes(specs, inputs, names):
    """``--input-shape`` values (``1x32x32x3`` or ``NAME=1x32x32x3``) as ``{tensor index: shape}``."""
    shapes = {}
    for spec in specs or []:
        try:
            label, shape = protocol.parse_shape(spec)
        except ValueError as exc:
            raise RunnerError(str(exc), "usage")
        if label:
            match = [d for d in inputs if label in names[int(d["index"])]]
        else:
            match = list(inputs) if len(inputs) == 1 else []
        if not match:
            raise RunnerError("--input-shape %r names no model input (inputs: %s); use NAME=SHAPE" % (spec, ", ".join(
                repr(names[int(d["index"])][0]) for d in inputs)), "usage")
        shapes[int(match[0]["index"])] = shape
    return shapes


def resize_inputs(interp, inputs, names, shapes, source):
    """Resize (before ``allocate_tensors``) the inputs whose shape differs from ``shapes`` (``{index: shape}``);
    a dynamic input left without a shape is an error. Returns the resize notes for the report."""
    done = []
    for d in inputs:
        index = int(d["index"])
        sig = [int(s) for s in d.get("shape_signature", d["shape"])]
        current = [int(s) for s in d["shape"]]
        label = names[index][0]
        want = shapes.get(index)
        if want is None:
            if any(s < 0 for s in sig[1:]):
                raise RunnerError("model input %r has a dynamic shape %s; give eval data (their samples set the "
                                  "shape) or --input-shape %s" % (label, sig, "x".join(
                                      str(s if s > 0 else 32) for s in [1] + sig[1:])), "data")
            continue
        if len(want) != len(sig) or any(w >= 0 and w != g for w, g in zip(sig[1:], want[1:])):
            raise RunnerError("shape %s from %s does not fit model input %r (%s)" % (want, source, label, sig), "data")
        if want != current:
            try:
                interp.resize_tensor_input(index, want)
            except Exception as exc:
                raise RunnerError("the runtime cannot resize input %r to %s: %s" % (label, want, facts.first_line(exc)),
                                  "model")
            done.append({"input": label, "shape": want, "from": sig, "source": source})
    return done


def reset_state(interp):
    """Reset variable tensors (a fused LSTM keeps its state in them across invocations); None if the runtime
    cannot."""
    reset = getattr(interp, "reset_all_variables", None)
    if reset is None:
        return None
    reset()
    return reset


def resource_variables(interp):
    """True if the model keeps state in resource variables (VAR_HANDLE: a Keras ``stateful=True`` RNN), which
    ``reset_all_variables`` does not reset: only a fresh interpreter starts from the initial state."""
    get_ops = getattr(interp, "_get_ops_details", None)
    if get_ops is None:
        return False
    try:
        return any(str(op.get("op_name")) == "VAR_HANDLE" for op in get_ops()[:100000])
    except Exception:  # a runtime whose op details are not what we expect
        return False


def fresh_interpreter(Interpreter, kwargs, bound):
    """A new interpreter for the same model, at the input shapes of ``bound`` (the eval arrays)."""
    def make():
        interp = Interpreter(**kwargs)
        for d, arr in bound:
            want = [1] + [int(n) for n in arr.shape[1:]]
            if want != [int(n) for n in d["shape"]]:
                interp.resize_tensor_input(d["index"], want)
        interp.allocate_tensors()
        return interp
    return make


def _eval_limit():
    """Bytes of eval arrays the runner loads at most: NPZ_MAX_BYTES, and at most half the memory available."""
    limit = NPZ_MAX_BYTES
    _total, available = facts.meminfo()
    if available:
        limit = min(limit, available // 2)
    return limit


def _npy_declared_bytes(path, limit):
    """Bytes a plain .npy file declares in its header (read without numpy allocating anything)."""
    try:
        with open(path, "rb") as f:
            declared = _npy_declared(f, path, "is neither an .npz archive nor an .npy array")
            holds = os.fstat(f.fileno()).st_size - f.tell()
    except RunnerError:
        raise
    except Exception as exc:
        raise RunnerError("cannot read eval data %s: %s" % (path, facts.first_line(exc)), "data")
    if declared > holds or declared > limit:
        raise RunnerError("eval data %s: the array declares %d bytes (the file holds %d, the runner loads at most "
                          "%d)" % (path, declared, holds, limit), "data")
    return declared


def load_eval(np, path):
    """``{name: array}`` from an eval .npz (``{"x": array}`` from an .npy); the sizes the arrays declare are checked
    against what the runner loads before numpy allocates any of them."""
    import zipfile

    limit = _eval_limit()
    try:
        archive = zipfile.is_zipfile(path)
    except (OSError, IOError) as exc:
        raise RunnerError("cannot read eval data %s: %s" % (path, facts.first_line(exc)), "data")
    if archive:
        _npz_declared_bytes(path, limit)
    else:
        _npy_declared_bytes(path, limit)
    try:
        loaded = np.load(path, allow_pickle=False)
        if hasattr(loaded, "files"):
            with loaded as npz:
                data = dict((k, npz[k]) for k in npz.files)
        else:
            data = {"x": loaded}
    except RunnerError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # a corrupt zip, an object array, a truncated file
        raise RunnerError("cannot read eval data %s: %s" % (path, facts.first_line(exc)), "data")
    for key, arr in data.items():
        if not hasattr(arr, "dtype") or arr.ndim < 1 or arr.dtype.kind not in "iufb":
            raise RunnerError("eval array %r in %s is not a numeric array with samples on the first axis"
                              % (key, path), "data")
    return data
