"""The KServe V2 JSON headers as pydantic models, in the spirit of KServe's ``v2_datamodels``.

These describe the JSON part of a request and of an answer (and the metadata answers) for the
OpenAPI document and check its types once. What a tensor holds is left as it came (``data`` is
not validated element by element: a PIXELS input is 150,528 numbers per image, checked at C speed
in ``v2_tensors``), and the binary tensor extension's bytes are framed and checked there too.
Parameters are open maps in the protocol; the few this server reads are typed.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field

from service.protocols.wire import Wire

NonNegative = Annotated[int, Field(ge=0)]


class Open(Wire):
    """A V2 object: other keys are allowed (and ignored), as the protocol's parameters are."""

    model_config = ConfigDict(extra="allow")


class InputParameters(Open):
    binary_data_size: Annotated[Any, Field(description="the byte size of this input's binary section")] = None


class RequestInput(Open):
    name: Annotated[str, Field(description="IMAGE or PIXELS")]
    datatype: Annotated[str, Field(description="BYTES for IMAGE, FP32 for PIXELS")]
    shape: Annotated[list[NonNegative], Field(description="an array of non-negative integers")]
    parameters: Annotated[InputParameters, Field(description="an object")] = InputParameters()
    data: Annotated[Any, Field(description="the tensor's elements, row-major (nested or flat); base64 strings for BYTES")] = None


class OutputParameters(Open):
    binary_data: Annotated[bool | None, Field(description="true or false: send this output as binary data")] = None
    classification: Annotated[NonNegative, Field(description="a non-negative integer: top-k as score:index:label")] = 0


class RequestOutput(Open):
    name: Annotated[str, Field(description="PROBABILITIES")]
    parameters: Annotated[OutputParameters, Field(description="an object")] = OutputParameters()


class RequestParameters(Open):
    binary_data_output: Annotated[bool, Field(description="true or false: send every output as binary data")] = False
    timeout: Annotated[NonNegative | None, Field(description="a non-negative integer (microseconds)")] = None


class InferenceRequest(Open):
    """The JSON header of ``POST /v2/models/{name}/infer``."""

    id: Annotated[str | None, Field(description="a string")] = None
    parameters: Annotated[RequestParameters, Field(description="an object")] = RequestParameters()
    inputs: Annotated[list[RequestInput], Field(min_length=1, description="a non-empty array of input tensors")]
    outputs: Annotated[list[RequestOutput] | None, Field(description="an array of requested outputs")] = None


class ResponseOutput(Wire):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(Wire):
    """The JSON header of an inference answer (binary outputs follow it)."""

    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any]
    outputs: list[ResponseOutput]


class TensorMetadata(Wire):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(Wire):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ServerMetadata(Wire):
    name: str
    version: str
    extensions: list[str]
