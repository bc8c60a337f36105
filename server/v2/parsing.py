"""A V2 request read and checked, before anything runs: its scalar parameters, its sequence id, its
input tensors as engine input (a language model's text or ids, a classifier's batch), its generation
parameters as a GenerateRequest, and the outputs it asks for. Bad input is an InvalidArgument that names
the tensor or parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rnnserve.server.errors import InvalidArgument
from rnnserve.server.generation import GenerateRequest
from rnnserve.server.quoting import quote
from rnnserve.server.sampling import SamplingParams
from rnnserve.server.v2.tensors import INTEGER_TYPES, InferRequest, ParamValue, Tensor

GENERATION_PARAMETERS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "ignore_eos")


def param(params: Mapping[str, ParamValue], name: str, kind: type, default: Any) -> Any:
    value = params.get(name)
    if value is None:
        return default
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise InvalidArgument(f"parameter {name} must be {kind.__name__}, got {quote(str(value))}")


def sequence_key(params: Mapping[str, ParamValue]) -> str | None:
    """The request's sequence id as a key ("u:<n>" / "s:<text>"), or None outside a sequence (0 or "")."""
    value = params.get("sequence_id")
    if value is None or value == 0 or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidArgument(f"sequence_id must be an unsigned integer or a string, got {quote(str(value))}")
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgument(f"sequence_id must be an unsigned integer or a string, got {value}")
        return f"u:{value}"
    return f"s:{value}"


def bytes_elements(tensor: Tensor) -> list[bytes]:
    if tensor.datatype != "BYTES" or not isinstance(tensor.data, list):
        raise InvalidArgument(f"input {tensor.name} must be BYTES, got {tensor.datatype}")
    return tensor.data


def utf8_texts(tensor: Tensor) -> list[str]:
    out = []
    for i, b in enumerate(bytes_elements(tensor)):
        try:
            out.append(b.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"input {tensor.name} element {i} is not UTF-8: {e}") from None
    return out


def int_array(tensor: Tensor) -> np.ndarray:
    if tensor.datatype not in INTEGER_TYPES or not isinstance(tensor.data, np.ndarray):
        raise InvalidArgument(
            f"input {tensor.name} must be INT64 (or another integer type), got {tensor.datatype}"
        )
    return tensor.data.reshape(tensor.shape) if tensor.shape else tensor.data


def single_row(tensor: Tensor, what: str) -> None:
    if tensor.shape and (len(tensor.shape) > 2 or tensor.shape[0] != 1):
        raise InvalidArgument(
            f"input {tensor.name} must have shape {what} (one sequence per request), got {tensor.shape}"
        )


def inputs_by_name(request: InferRequest, allowed: Sequence[str]) -> dict[str, Tensor]:
    by_name: dict[str, Tensor] = {}
    for t in request.inputs:
        if t.name not in allowed:
            raise InvalidArgument(
                f"model {quote(request.model)} has no input {quote(t.name)} (inputs: {', '.join(allowed)})"
            )
        if t.name in by_name:
            raise InvalidArgument(f"input {t.name} is given twice")
        by_name[t.name] = t
    return by_name


def one_input(by_name: Mapping[str, Tensor], model: str, required: bool) -> Tensor | None:
    given = [by_name[n] for n in ("INPUT_IDS", "TEXT") if n in by_name]
    if len(given) > 1:
        raise InvalidArgument("give INPUT_IDS or TEXT, not both")
    if not given and required:
        raise InvalidArgument(f"model {quote(model)} needs an input: INPUT_IDS (INT64) or TEXT (BYTES)")
    return given[0] if given else None


def lm_input(tensor: Tensor | None) -> str | list[int] | None:
    if tensor is None:
        return None
    if tensor.name == "TEXT":
        single_row(tensor, "[1]")
        texts = utf8_texts(tensor)
        if len(texts) != 1:
            raise InvalidArgument(f"input TEXT must hold one element, got {len(texts)}")
        return texts[0]
    single_row(tensor, "[1, n]")
    return [int(i) for i in int_array(tensor).reshape(-1)]


def batch_inputs(tensor: Tensor) -> list[str | list[int]]:
    if tensor.name == "TEXT":
        if len(tensor.shape) > 2 or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise InvalidArgument(f"input TEXT must have shape [n] or [n, 1], got {tensor.shape}")
        return list(utf8_texts(tensor))
    ids = int_array(tensor)
    rows = ids.reshape(1, -1) if ids.ndim < 2 else ids.reshape(ids.shape[0], -1)
    return [[int(i) for i in row] for row in rows]


def select_outputs(outputs: list[Tensor], requested: Sequence[str], allowed: Sequence[str]) -> list[Tensor]:
    if not requested:
        return outputs
    unknown = [n for n in requested if n not in allowed]
    if unknown:
        raise InvalidArgument(f"unknown output {quote(unknown[0])} (outputs: {', '.join(allowed)})")
    return [t for t in outputs if t.name in requested]


def generate_request(request: InferRequest, prompt: str | list[int] | None) -> GenerateRequest:
    """The native GenerateRequest that a generating V2 request means (see mapping.py's docstring)."""
    p = request.parameters
    max_tokens = param(p, "max_tokens", int, 0)
    for t in request.inputs:
        if t.name == "MAX_TOKENS":
            values = int_array(t).reshape(-1)
            if values.size != 1:
                raise InvalidArgument(f"input MAX_TOKENS must hold one element, got {values.size}")
            max_tokens = int(values[0])
    stop = p.get("stop")
    stops: list[str] = []
    if isinstance(stop, str):
        stops = [stop]
    elif stop is not None:
        raise InvalidArgument(f"parameter stop must be a string, got {quote(str(stop))}")
    top_p = param(p, "top_p", float, 1.0)
    seed = param(p, "seed", int, None)
    return GenerateRequest(
        sampling=SamplingParams(
            temperature=param(p, "temperature", float, 0.0),
            top_k=param(p, "top_k", int, 0),
            top_p=top_p if top_p != 0 else 1.0,
            seed=seed,
        ),
        max_tokens=max_tokens,
        stop=stops,
        ignore_eos=param(p, "ignore_eos", bool, False),
        prompt=prompt,
    )
