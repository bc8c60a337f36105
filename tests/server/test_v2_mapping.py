"""The V2 mapping's tensor codecs and parameters, and the gRPC request conversion, without a server or
tritonclient (tests/integration/test_v2_*.py drive the real thing)."""

from __future__ import annotations

import numpy as np
import pytest

from rnnserve.inference import grpc_service_pb2 as pb
from rnnserve.server.errors import InvalidArgument
from rnnserve.server.v2.grpc_service import request_of, response_pb
from rnnserve.server.v2.parsing import sequence_key
from rnnserve.server.v2.tensors import (
    InferResponse,
    Tensor,
    decode_bytes,
    encode_bytes,
    tensor_from_raw,
    tensor_from_values,
    tensor_raw,
)


def test_bytes_elements_round_trip_in_raw_form() -> None:
    elements = [b"", b"abc", "é".encode()]
    assert decode_bytes(encode_bytes(elements), 3, "TEXT") == elements
    with pytest.raises(InvalidArgument, match="2 BYTES elements for shape of 3"):
        decode_bytes(encode_bytes(elements[:2]), 3, "TEXT")
    with pytest.raises(InvalidArgument, match="runs past the end"):
        decode_bytes(encode_bytes([b"abc"])[:-1], 1, "TEXT")


def test_raw_and_typed_tensors_agree() -> None:
    ids = np.array([[3, 1, 4]], dtype=np.int64)
    raw = tensor_from_raw("INPUT_IDS", "INT64", [1, 3], ids.tobytes())
    typed = tensor_from_values("INPUT_IDS", "INT64", [1, 3], [3, 1, 4])
    assert isinstance(raw.data, np.ndarray) and isinstance(typed.data, np.ndarray)
    np.testing.assert_array_equal(raw.data, typed.data)
    assert tensor_raw(raw) == ids.tobytes()
    with pytest.raises(InvalidArgument, match="expected 24"):
        tensor_from_raw("INPUT_IDS", "INT64", [1, 3], ids.tobytes()[:-1])
    with pytest.raises(InvalidArgument, match="2 values for shape"):
        tensor_from_values("INPUT_IDS", "INT64", [1, 3], [1, 2])


def test_sequence_ids_are_numbers_or_strings() -> None:
    assert sequence_key({}) is None
    assert sequence_key({"sequence_id": 0}) is None
    assert sequence_key({"sequence_id": ""}) is None
    assert sequence_key({"sequence_id": 7}) == "u:7"
    assert sequence_key({"sequence_id": "7"}) == "s:7"
    with pytest.raises(InvalidArgument):
        sequence_key({"sequence_id": True})


def test_grpc_requests_and_responses_convert() -> None:
    request = pb.ModelInferRequest(model_name="tiny", id="r1")
    request.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(encode_bytes([b"hi"]))
    request.parameters["sequence_id"].int64_param = 5
    request.parameters["sequence_start"].bool_param = True
    parsed = request_of(request)
    assert parsed.inputs[0].data == [b"hi"]
    assert parsed.parameters == {"sequence_id": 5, "sequence_start": True}
    typed = pb.ModelInferRequest(model_name="tiny")
    typed.inputs.add(name="INPUT_IDS", datatype="INT64", shape=[1, 2]).contents.int64_contents.extend([1, 2])
    assert request_of(typed).inputs[0].data.tolist() == [[1, 2]]  # type: ignore[union-attr]
    mixed = pb.ModelInferRequest(model_name="tiny")
    mixed.inputs.add(name="A", datatype="INT64", shape=[1])
    mixed.inputs.add(name="B", datatype="INT64", shape=[1])
    mixed.raw_input_contents.append(b"\0" * 8)
    with pytest.raises(InvalidArgument, match="1 raw_input_contents for 2 inputs"):
        request_of(mixed)
    out = response_pb(
        InferResponse(
            "tiny", "1", "r1", [Tensor("LABEL", "BYTES", [1], [b"pos"])], {"finish_reason": "length"}
        )
    )
    assert out.raw_output_contents == [encode_bytes([b"pos"])]
    assert out.parameters["finish_reason"].string_param == "length"
