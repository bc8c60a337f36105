"""V2 tensors, protocol-neutral: a request and a response as named numpy arrays (BYTES: lists of bytes)
with scalar parameters, and the tensors' wire forms that both transports share (raw bytes, where a BYTES
element is a 4-byte little-endian length and its bytes; flat lists of values). Knows nothing of models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rnnserve.server.errors import InvalidArgument
from rnnserve.server.quoting import quote

ParamValue = bool | int | float | str
Data = np.ndarray | list[bytes]

# V2 datatype <-> numpy dtype (BYTES: lists of bytes).
NUMPY_TYPES: dict[str, type[np.generic]] = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
INTEGER_TYPES = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    data: Data  # numpy array (flat or shaped) or, for BYTES, the elements in order

    def count(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass
class InferRequest:
    model: str
    version: str = ""
    id: str = ""
    inputs: list[Tensor] = field(default_factory=list)
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)  # requested output names; empty: all


@dataclass
class InferResponse:
    model: str
    version: str
    id: str
    outputs: list[Tensor]
    parameters: dict[str, ParamValue] = field(default_factory=dict)


# -- response tensors ------------------------------------------------------------------------------


def fp32_tensor(name: str, values: Any, shape: list[int]) -> Tensor:
    return Tensor(name, "FP32", shape, np.asarray(values, dtype=np.float32).reshape(shape))


def int64_tensor(name: str, values: Any, shape: list[int]) -> Tensor:
    return Tensor(name, "INT64", shape, np.asarray(values, dtype=np.int64).reshape(shape))


def bytes_tensor(name: str, texts: Sequence[str]) -> Tensor:
    """Texts as a BYTES tensor of shape [len(texts)] (UTF-8)."""
    return Tensor(name, "BYTES", [len(texts)], [t.encode("utf-8") for t in texts])


# -- BYTES tensors in raw form: each element as a 4-byte little-endian length and its bytes ----------


def encode_bytes(elements: Sequence[bytes]) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def decode_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    out: list[bytes] = []
    i = 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise InvalidArgument(f"input {name}: truncated BYTES element length at byte {i}")
        n = int.from_bytes(raw[i : i + 4], "little")
        i += 4
        if i + n > len(raw):
            raise InvalidArgument(f"input {name}: BYTES element of {n} bytes runs past the end of the data")
        out.append(raw[i : i + n])
        i += n
    if len(out) != count:
        raise InvalidArgument(f"input {name}: {len(out)} BYTES elements for shape of {count} elements")
    return out


def tensor_from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> Tensor:
    """A tensor from its raw bytes (gRPC raw_input_contents, REST binary data)."""
    count = int(np.prod(shape)) if shape else 1
    if datatype == "BYTES":
        return Tensor(name, datatype, shape, decode_bytes(raw, count, name))
    dtype = NUMPY_TYPES.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"input {name}: unsupported datatype {quote(datatype)}")
    size = np.dtype(dtype).itemsize * count
    if len(raw) != size:
        raise InvalidArgument(
            f"input {name}: {len(raw)} bytes of data for shape {shape} of {datatype} (expected {size})"
        )
    return Tensor(name, datatype, shape, np.frombuffer(raw, dtype=dtype).reshape(shape))


def tensor_from_values(name: str, datatype: str, shape: list[int], values: Sequence[Any]) -> Tensor:
    """A tensor from a flat list of values (gRPC typed contents, REST JSON data)."""
    count = int(np.prod(shape)) if shape else 1
    if len(values) != count:
        raise InvalidArgument(f"input {name}: {len(values)} values for shape {shape} ({count} elements)")
    if datatype == "BYTES":
        return Tensor(
            name, datatype, shape, [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
        )
    dtype = NUMPY_TYPES.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"input {name}: unsupported datatype {quote(datatype)}")
    try:
        array = np.asarray(values, dtype=dtype).reshape(shape)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidArgument(f"input {name}: values are not {datatype}: {e}") from None
    return Tensor(name, datatype, shape, array)


def tensor_raw(tensor: Tensor) -> bytes:
    if isinstance(tensor.data, list):
        return encode_bytes(tensor.data)
    return np.ascontiguousarray(tensor.data, dtype=NUMPY_TYPES[tensor.datatype]).tobytes()
