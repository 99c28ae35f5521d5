"""Read an ONNX file's structure without its inline weight bytes.

`onnx.load` parses the whole file into protobuf messages and hands out every initializer's
`raw_data` as a fresh bytes object: importing a 1 GB file costs 2 GB of memory before any pass
runs. Here the file is memory-mapped
and walked at the protobuf wire level down to the graph's initializers (ModelProto.graph = 7,
GraphProto.initializer = 5, TensorProto.raw_data = 9). The message is re-encoded without those
bytes, which leaves a small model to parse, and each initializer's bytes are located in the file,
where the weight store maps them in place (`WeightStore.add_from_file`).

Only the wire format is read here (varints, length-delimited fields); what the fields mean is
left to the parsed message. Anything that is not well-formed protobuf is a ValueError.
"""

from __future__ import annotations

import mmap
from pathlib import Path

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError(f"a varint runs past its message at byte {pos}")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(buf, start: int, end: int):
    """(field number, wire type, first byte of the field's key, first byte of its payload, end
    of its payload) for each field of the message at buf[start:end]."""
    pos = start
    while pos < end:
        key_at = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, stop = _varint(buf, pos, end)
        elif wire == _I64:
            stop = pos + 8
        elif wire == _I32:
            stop = pos + 4
        elif wire == _LEN:
            length, pos = _varint(buf, pos, end)
            stop = pos + length
        else:
            raise ValueError(f"wire type {wire} (field {number}) at byte {key_at} is not used by ONNX")
        if number == 0 or stop > end:
            raise ValueError(f"field {number} at byte {key_at} runs past its message")
        yield number, wire, key_at, pos, stop
        pos = stop


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _LEN) + _encode_varint(len(payload)) + payload


def _rewrite(buf, start: int, end: int, number: int, rewrite) -> tuple[bytes, list]:
    """The message buf[start:end] re-encoded with each length-delimited field `number` replaced
    by `rewrite(payload start, payload end)` -> (new payload, or None to drop the field; a
    record); returns the bytes and the records in field order."""
    out, records, copied = [], [], start
    for field, wire, key_at, pos, stop in _fields(buf, start, end):
        if field == number and wire == _LEN:
            out.append(buf[copied:key_at])
            payload, record = rewrite(pos, stop)
            if payload is not None:
                out.append(_length_delimited(number, payload))
            records.append(record)
            copied = stop
    out.append(buf[copied:end])
    return b"".join(out), records


def split_model(path: Path) -> tuple[bytes, list[tuple[int, int] | None]]:
    """The file's ModelProto bytes without the initializers' raw_data, and for each initializer
    of the graph in order, the (offset, length) of its raw_data in the file (None: the tensor
    keeps its data in other fields, or in external data)."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            raise ValueError("the file is empty")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        def tensor(start, end):
            # protobuf keeps the last of repeated scalar fields
            tensor, raw = _rewrite(buf, start, end, _TENSOR_RAW_DATA, lambda pos, stop: (None, (pos, stop - pos)))
            return tensor, raw[-1] if raw else None

        def graph(start, end):
            return _rewrite(buf, start, end, _GRAPH_INITIALIZER, tensor)

        model, graphs = _rewrite(buf, 0, len(buf), _MODEL_GRAPH, graph)
    finally:
        buf.close()
    if len(graphs) > 1:  # protobuf would merge them; no exporter writes that
        raise ValueError(f"the model has {len(graphs)} graph fields")
    return model, graphs[0] if graphs else []
