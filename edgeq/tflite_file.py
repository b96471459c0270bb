"""Read a ``.tflite`` file without TensorFlow.

A small, dependency-free FlatBuffer reader for the parts of the TFLite schema
edgeq needs (tensors, operators, op codes, buffers, quantization). Field
numbers follow ``tensorflow/compiler/mlir/lite/schema/schema.fbs``.
"""

from __future__ import annotations

import hashlib
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from edgeq.errors import ModelError

# BuiltinOperator names by code, generated from the LiteRT schema
# (ai_edge_litert/schema_py_generated.py); tests check it against that module.
BUILTIN_OP_NAMES: tuple[str, ...] = (
    'ADD', 'AVERAGE_POOL_2D', 'CONCATENATION', 'CONV_2D', 'DEPTHWISE_CONV_2D',
    'DEPTH_TO_SPACE', 'DEQUANTIZE', 'EMBEDDING_LOOKUP', 'FLOOR', 'FULLY_CONNECTED',
    'HASHTABLE_LOOKUP', 'L2_NORMALIZATION', 'L2_POOL_2D', 'LOCAL_RESPONSE_NORMALIZATION',
    'LOGISTIC', 'LSH_PROJECTION', 'LSTM', 'MAX_POOL_2D', 'MUL', 'RELU', 'RELU_N1_TO_1',
    'RELU6', 'RESHAPE', 'RESIZE_BILINEAR', 'RNN', 'SOFTMAX', 'SPACE_TO_DEPTH', 'SVDF', 'TANH',
    'CONCAT_EMBEDDINGS', 'SKIP_GRAM', 'CALL', 'CUSTOM', 'EMBEDDING_LOOKUP_SPARSE', 'PAD',
    'UNIDIRECTIONAL_SEQUENCE_RNN', 'GATHER', 'BATCH_TO_SPACE_ND', 'SPACE_TO_BATCH_ND',
    'TRANSPOSE', 'MEAN', 'SUB', 'DIV', 'SQUEEZE', 'UNIDIRECTIONAL_SEQUENCE_LSTM',
    'STRIDED_SLICE', 'BIDIRECTIONAL_SEQUENCE_RNN', 'EXP', 'TOPK_V2', 'SPLIT', 'LOG_SOFTMAX',
    'DELEGATE', 'BIDIRECTIONAL_SEQUENCE_LSTM', 'CAST', 'PRELU', 'MAXIMUM', 'ARG_MAX',
    'MINIMUM', 'LESS', 'NEG', 'PADV2', 'GREATER', 'GREATER_EQUAL', 'LESS_EQUAL', 'SELECT',
    'SLICE', 'SIN', 'TRANSPOSE_CONV', 'SPARSE_TO_DENSE', 'TILE', 'EXPAND_DIMS', 'EQUAL',
    'NOT_EQUAL', 'LOG', 'SUM', 'SQRT', 'RSQRT', 'SHAPE', 'POW', 'ARG_MIN', 'FAKE_QUANT',
    'REDUCE_PROD', 'REDUCE_MAX', 'PACK', 'LOGICAL_OR', 'ONE_HOT', 'LOGICAL_AND', 'LOGICAL_NOT',
    'UNPACK', 'REDUCE_MIN', 'FLOOR_DIV', 'REDUCE_ANY', 'SQUARE', 'ZEROS_LIKE', 'FILL',
    'FLOOR_MOD', 'RANGE', 'RESIZE_NEAREST_NEIGHBOR', 'LEAKY_RELU', 'SQUARED_DIFFERENCE',
    'MIRROR_PAD', 'ABS', 'SPLIT_V', 'UNIQUE', 'CEIL', 'REVERSE_V2', 'ADD_N', 'GATHER_ND',
    'COS', 'WHERE', 'RANK', 'ELU', 'REVERSE_SEQUENCE', 'MATRIX_DIAG', 'QUANTIZE',
    'MATRIX_SET_DIAG', 'ROUND', 'HARD_SWISH', 'IF', 'WHILE', 'NON_MAX_SUPPRESSION_V4',
    'NON_MAX_SUPPRESSION_V5', 'SCATTER_ND', 'SELECT_V2', 'DENSIFY', 'SEGMENT_SUM',
    'BATCH_MATMUL', 'PLACEHOLDER_FOR_GREATER_OP_CODES', 'CUMSUM', 'CALL_ONCE', 'BROADCAST_TO',
    'RFFT2D', 'CONV_3D', 'IMAG', 'REAL', 'COMPLEX_ABS', 'HASHTABLE', 'HASHTABLE_FIND',
    'HASHTABLE_IMPORT', 'HASHTABLE_SIZE', 'REDUCE_ALL', 'CONV_3D_TRANSPOSE', 'VAR_HANDLE',
    'READ_VARIABLE', 'ASSIGN_VARIABLE', 'BROADCAST_ARGS', 'RANDOM_STANDARD_NORMAL',
    'BUCKETIZE', 'RANDOM_UNIFORM', 'MULTINOMIAL', 'GELU', 'DYNAMIC_UPDATE_SLICE',
    'RELU_0_TO_1', 'UNSORTED_SEGMENT_PROD', 'UNSORTED_SEGMENT_MAX', 'UNSORTED_SEGMENT_SUM',
    'ATAN2', 'UNSORTED_SEGMENT_MIN', 'SIGN', 'BITCAST', 'BITWISE_XOR', 'RIGHT_SHIFT',
    'STABLEHLO_LOGISTIC', 'STABLEHLO_ADD', 'STABLEHLO_DIVIDE', 'STABLEHLO_MULTIPLY',
    'STABLEHLO_MAXIMUM', 'STABLEHLO_RESHAPE', 'STABLEHLO_CLAMP', 'STABLEHLO_CONCATENATE',
    'STABLEHLO_BROADCAST_IN_DIM', 'STABLEHLO_CONVOLUTION', 'STABLEHLO_SLICE',
    'STABLEHLO_CUSTOM_CALL', 'STABLEHLO_REDUCE', 'STABLEHLO_ABS', 'STABLEHLO_AND',
    'STABLEHLO_COSINE', 'STABLEHLO_EXPONENTIAL', 'STABLEHLO_FLOOR', 'STABLEHLO_LOG',
    'STABLEHLO_MINIMUM', 'STABLEHLO_NEGATE', 'STABLEHLO_OR', 'STABLEHLO_POWER',
    'STABLEHLO_REMAINDER', 'STABLEHLO_RSQRT', 'STABLEHLO_SELECT', 'STABLEHLO_SUBTRACT',
    'STABLEHLO_TANH', 'STABLEHLO_SCATTER', 'STABLEHLO_COMPARE', 'STABLEHLO_CONVERT',
    'STABLEHLO_DYNAMIC_SLICE', 'STABLEHLO_DYNAMIC_UPDATE_SLICE', 'STABLEHLO_PAD',
    'STABLEHLO_IOTA', 'STABLEHLO_DOT_GENERAL', 'STABLEHLO_REDUCE_WINDOW', 'STABLEHLO_SORT',
    'STABLEHLO_WHILE', 'STABLEHLO_GATHER', 'STABLEHLO_TRANSPOSE', 'DILATE',
    'STABLEHLO_RNG_BIT_GENERATOR', 'REDUCE_WINDOW', 'STABLEHLO_COMPOSITE',
    'STABLEHLO_SHIFT_LEFT', 'STABLEHLO_CBRT', 'STABLEHLO_CASE',
)

# TensorType names by code (schema.fbs `enum TensorType`).
TENSOR_TYPE_NAMES: tuple[str, ...] = (
    "float32", "float16", "int32", "uint8", "int64", "string", "bool", "int16",
    "complex64", "int8", "float64", "complex128", "uint64", "resource", "variant",
    "uint32", "uint16", "int4", "bfloat16", "int2", "uint4", "float8_e4m3fn", "float8_e5m2",
)

# Bytes per element for the types edgeq reasons about; others count as 0.
_ELEMENT_BYTES = {
    "float32": 4, "float16": 2, "int32": 4, "uint8": 1, "int64": 8, "bool": 1,
    "int16": 2, "int8": 1, "float64": 8, "uint64": 8, "uint32": 4, "uint16": 2,
    "complex64": 8, "complex128": 16, "bfloat16": 2,
}

_FILE_IDENTIFIER = b"TFL3"


@dataclass(frozen=True)
class Quantization:
    """Per-tensor or per-axis affine quantization parameters."""

    scale: tuple[float, ...] = ()
    zero_point: tuple[int, ...] = ()
    quantized_dimension: int = 0

    @property
    def is_per_channel(self) -> bool:
        return len(self.scale) > 1


@dataclass(frozen=True)
class Tensor:
    """One tensor of a subgraph."""

    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    shape_signature: tuple[int, ...]
    buffer: int
    has_data: bool
    quantization: Quantization | None
    is_variable: bool

    @property
    def num_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= max(d, 1)
        return n

    @property
    def nbytes(self) -> int:
        return self.num_elements * _ELEMENT_BYTES.get(self.dtype, 0)


@dataclass(frozen=True)
class Operator:
    """One operator of a subgraph, with its op name resolved."""

    index: int
    op: str
    custom_code: str | None
    version: int
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclass(frozen=True)
class Subgraph:
    """A subgraph: tensors, operators and its inputs/outputs (tensor indices)."""

    name: str
    tensors: tuple[Tensor, ...]
    operators: tuple[Operator, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


def op_dtype(sg: Subgraph, op: Operator) -> str:
    """The type an op computes on: its first non-constant input (or its first output)."""
    for i in op.inputs:
        if 0 <= i < len(sg.tensors) and not sg.tensors[i].has_data:
            return sg.tensors[i].dtype
    for i in op.outputs:
        if 0 <= i < len(sg.tensors):
            return sg.tensors[i].dtype
    return "unknown"


@dataclass(frozen=True)
class TfliteModel:
    """What edgeq knows about a ``.tflite`` file after reading it once."""

    path: str
    size_bytes: int
    sha256: str
    schema_version: int
    description: str
    subgraphs: tuple[Subgraph, ...]
    buffer_bytes: tuple[int, ...] = field(repr=False)

    @property
    def main(self) -> Subgraph:
        return self.subgraphs[0]

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        return tuple(self.main.tensors[i] for i in self.main.inputs)

    @property
    def outputs(self) -> tuple[Tensor, ...]:
        return tuple(self.main.tensors[i] for i in self.main.outputs)

    @property
    def operators(self) -> tuple[Operator, ...]:
        return tuple(op for sg in self.subgraphs for op in sg.operators)

    @property
    def op_counts(self) -> dict[str, int]:
        """Op name -> how many times it occurs, most common first."""
        return dict(Counter(op.op for op in self.operators).most_common())

    @property
    def weight_bytes(self) -> int:
        """Bytes of constant data (weights, biases) stored in the file."""
        return sum(self.buffer_bytes)

    def tensor_dtypes(self) -> set[str]:
        """Every dtype used by any tensor of any subgraph."""
        return {t.dtype for sg in self.subgraphs for t in sg.tensors}


# The work of parsing is bounded by the file's size, not only its offsets: a
# FlatBuffer may point many vectors at one table (a 12 KB file can describe
# billions of tensors that way). Every table visited and every vector element
# or string byte read costs one unit; a file whose parts are not shared needs at
# most one unit per byte, so a budget of a few units per byte never refuses a
# real model and makes a crafted one fail after O(file size) work.
WORK_PER_BYTE = 4
WORK_BASE = 65536


class Reader:
    """Bounds-checked FlatBuffer table access over one byte string, with a work budget."""

    def __init__(self, buf: bytes, where: str, budget: int | None = None) -> None:
        self.buf = buf
        self.where = where
        self.budget = WORK_PER_BYTE * len(buf) + WORK_BASE if budget is None else budget
        self.spent = 0

    def spend(self, units: int) -> None:
        self.spent += units
        if self.spent > self.budget:
            raise ModelError(
                f"{self.where} is not a valid .tflite file (its tables refer to each other more than "
                f"{self.budget} times for {len(self.buf)} bytes, as a crafted file does)",
                "check where the file came from; a converter never writes such a file",
            )

    def _bad(self, what: str) -> ModelError:
        return ModelError(
            f"{self.where} is not a valid .tflite file ({what})",
            "check that the file was fully copied and is a TFLite flatbuffer",
        )

    def u8(self, pos: int) -> int:
        return self._unpack("<B", pos)

    def i8(self, pos: int) -> int:
        return self._unpack("<b", pos)

    def u16(self, pos: int) -> int:
        return self._unpack("<H", pos)

    def i32(self, pos: int) -> int:
        return self._unpack("<i", pos)

    def u32(self, pos: int) -> int:
        return self._unpack("<I", pos)

    def u64(self, pos: int) -> int:
        return self._unpack("<Q", pos)

    def _unpack(self, fmt: str, pos: int) -> int:
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.buf):
            raise self._bad(f"offset {pos} out of range")
        return struct.unpack_from(fmt, self.buf, pos)[0]

    def field_pos(self, table: int, slot: int) -> int | None:
        vtable = table - self.i32(table)
        vsize = self.u16(vtable)
        entry = 4 + 2 * slot
        if entry >= vsize:
            return None
        off = self.u16(vtable + entry)
        return table + off if off else None

    def scalar(self, table: int, slot: int, fmt: str, default: int = 0) -> int:
        pos = self.field_pos(table, slot)
        return default if pos is None else self._unpack(fmt, pos)

    def indirect(self, table: int, slot: int) -> int | None:
        pos = self.field_pos(table, slot)
        return None if pos is None else pos + self.u32(pos)

    def vector(self, table: int, slot: int) -> tuple[int, int] | None:
        """(start of elements, length) of a vector field, or None."""
        pos = self.indirect(table, slot)
        if pos is None:
            return None
        n = self.u32(pos)
        if n > len(self.buf):
            raise self._bad("vector length out of range")
        return pos + 4, n

    def tables(self, table: int, slot: int) -> list[int]:
        vec = self.vector(table, slot)
        if vec is None:
            return []
        start, n = vec
        if start + 4 * n > len(self.buf):
            raise self._bad("vector data out of range")
        self.spend(n + 1)
        return [start + 4 * i + self.u32(start + 4 * i) for i in range(n)]

    def scalars(self, table: int, slot: int, fmt: str) -> tuple:
        vec = self.vector(table, slot)
        if vec is None:
            return ()
        start, n = vec
        size = struct.calcsize(fmt)
        if start + n * size > len(self.buf):
            raise self._bad("vector data out of range")
        self.spend(n + 1)
        return struct.unpack_from(f"<{n}{fmt}", self.buf, start)

    def string(self, table: int, slot: int) -> str | None:
        vec = self.vector(table, slot)
        if vec is None:
            return None
        start, n = vec
        if start + n > len(self.buf):
            raise self._bad("string out of range")
        self.spend(n + 1)
        return self.buf[start : start + n].decode("utf-8", errors="replace")


def read_tflite(path: str | Path) -> TfliteModel:
    """Read a ``.tflite`` file into a ``TfliteModel``; raise ``ModelError`` if it is not one."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{p}: no such file", "check the path to the .tflite model") from None
    except IsADirectoryError:
        raise ModelError(f"{p} is a directory, not a .tflite file") from None
    except OSError as exc:
        raise ModelError(f"{p}: cannot read ({exc.strerror})") from None
    return parse_tflite(data, str(p))


def parse_tflite(data: bytes, where: str = "<bytes>") -> TfliteModel:
    """Parse the bytes of a ``.tflite`` flatbuffer."""
    r = Reader(data, where)
    if len(data) < 8 or data[4:8] != _FILE_IDENTIFIER:
        raise r._bad("missing the TFL3 file identifier")
    try:
        return _parse_model(r, data, where)
    except ModelError:
        raise
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
        raise r._bad(str(exc)) from None


def _parse_model(r: Reader, data: bytes, where: str) -> TfliteModel:
    root = r.u32(0)
    version = r.scalar(root, 0, "<I")

    opcodes: list[tuple[str, str | None, int]] = []
    for oc in r.tables(root, 1):
        deprecated = r.scalar(oc, 0, "<b")
        builtin = r.scalar(oc, 3, "<i")
        # Old converters wrote only the int8 deprecated field, new ones both:
        # the larger of the two is the real code (tflite-micro runtime.py).
        code = max(builtin, deprecated)
        custom = r.string(oc, 1)
        name = BUILTIN_OP_NAMES[code] if 0 <= code < len(BUILTIN_OP_NAMES) else f"OP_{code}"
        if name == "CUSTOM" and custom:
            name = f"CUSTOM:{custom}"
        opcodes.append((name, custom, r.scalar(oc, 2, "<i", 1)))

    buffer_sizes: list[int] = []
    for b in r.tables(root, 4):
        vec = r.vector(b, 0)
        size = vec[1] if vec else 0
        if not size:
            size = r.scalar(b, 2, "<Q")  # models > 2 GB keep data after the flatbuffer
        buffer_sizes.append(size)

    subgraphs = []
    for sg in r.tables(root, 2):
        tensors = []
        for i, t in enumerate(r.tables(sg, 0)):
            tcode = r.scalar(t, 1, "<b")
            dtype = TENSOR_TYPE_NAMES[tcode] if 0 <= tcode < len(TENSOR_TYPE_NAMES) else f"type{tcode}"
            buf_index = r.scalar(t, 2, "<I")
            q = r.indirect(t, 4)
            quant = None
            if q is not None:
                scale = r.scalars(q, 2, "f")  # struct gives floats/ints already
                if scale:
                    quant = Quantization(
                        scale=scale,
                        zero_point=r.scalars(q, 3, "q"),
                        quantized_dimension=r.scalar(q, 6, "<i"),
                    )
            shape = r.scalars(t, 0, "i")
            tensors.append(
                Tensor(
                    index=i,
                    name=r.string(t, 3) or f"tensor_{i}",
                    dtype=dtype,
                    shape=shape,
                    shape_signature=r.scalars(t, 7, "i") or shape,
                    buffer=buf_index,
                    has_data=0 < buf_index < len(buffer_sizes) and buffer_sizes[buf_index] > 0,
                    quantization=quant,
                    is_variable=bool(r.scalar(t, 5, "<B")),
                )
            )
        operators = []
        for i, o in enumerate(r.tables(sg, 3)):
            idx = r.scalar(o, 0, "<I")
            if idx >= len(opcodes):
                raise r._bad(f"operator {i} refers to op code {idx} of {len(opcodes)}")
            name, custom, ver = opcodes[idx]
            operators.append(
                Operator(
                    index=i,
                    op=name,
                    custom_code=custom,
                    version=ver,
                    inputs=r.scalars(o, 1, "i"),
                    outputs=r.scalars(o, 2, "i"),
                )
            )
        n = len(tensors)
        for op in operators:
            for ti in op.inputs + op.outputs:
                if ti >= n:
                    raise r._bad(f"operator {op.index} ({op.op}) uses tensor {ti} of {n}")
        sg_inputs = r.scalars(sg, 1, "i")
        sg_outputs = r.scalars(sg, 2, "i")
        for ti in sg_inputs + sg_outputs:
            if not 0 <= ti < n:
                raise r._bad(f"subgraph input/output tensor {ti} of {n}")
        subgraphs.append(
            Subgraph(
                name=r.string(sg, 4) or "",
                tensors=tuple(tensors),
                operators=tuple(operators),
                inputs=sg_inputs,
                outputs=sg_outputs,
            )
        )
    if not subgraphs:
        raise r._bad("no subgraphs")

    return TfliteModel(
        path=where,
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        schema_version=version,
        description=r.string(root, 3) or "",
        subgraphs=tuple(subgraphs),
        buffer_bytes=tuple(buffer_sizes),
    )
