"""Decode the google.rpc.Status the server sends in `grpc-status-details-bin`.

The SDK must not depend on googleapis-common-protos, so google.rpc.Status,
ErrorInfo and RetryInfo are declared here by hand and built in a private
DescriptorPool. The server process installs googleapis-common-protos, which
registers the same names in the default pool; a private pool keeps the two
from ever clashing, whichever is imported first.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2, message_factory
from google.protobuf.message import DecodeError, Message

DETAILS_METADATA_KEY = "grpc-status-details-bin"
ERROR_INFO_TYPE_URL = "type.googleapis.com/google.rpc.ErrorInfo"
RETRY_INFO_TYPE_URL = "type.googleapis.com/google.rpc.RetryInfo"

_FieldProto = descriptor_pb2.FieldDescriptorProto


def _field(
    name: str, number: int, kind: _FieldProto.Type.ValueType, *, type_name: str = "", repeated: bool = False
) -> _FieldProto:
    label = _FieldProto.LABEL_REPEATED if repeated else _FieldProto.LABEL_OPTIONAL
    proto = _FieldProto(name=name, number=number, type=kind, label=label)
    if type_name:  # a set-but-empty type_name is an error for scalar fields
        proto.type_name = type_name
    return proto


def _status_file() -> descriptor_pb2.FileDescriptorProto:
    """google/rpc/status.proto, as far as the SDK needs it."""
    status = descriptor_pb2.DescriptorProto(
        name="Status",
        field=[
            _field("code", 1, _FieldProto.TYPE_INT32),
            _field("message", 2, _FieldProto.TYPE_STRING),
            _field("details", 3, _FieldProto.TYPE_MESSAGE, type_name=".google.protobuf.Any", repeated=True),
        ],
    )
    return descriptor_pb2.FileDescriptorProto(
        name="google/rpc/status.proto",
        package="google.rpc",
        syntax="proto3",
        dependency=["google/protobuf/any.proto"],
        message_type=[status],
    )


def _error_details_file() -> descriptor_pb2.FileDescriptorProto:
    """google/rpc/error_details.proto: ErrorInfo and RetryInfo only."""
    metadata_entry = descriptor_pb2.DescriptorProto(
        name="MetadataEntry",
        field=[
            _field("key", 1, _FieldProto.TYPE_STRING),
            _field("value", 2, _FieldProto.TYPE_STRING),
        ],
        options=descriptor_pb2.MessageOptions(map_entry=True),
    )
    error_info = descriptor_pb2.DescriptorProto(
        name="ErrorInfo",
        field=[
            _field("reason", 1, _FieldProto.TYPE_STRING),
            _field("domain", 2, _FieldProto.TYPE_STRING),
            _field(
                "metadata",
                3,
                _FieldProto.TYPE_MESSAGE,
                type_name=".google.rpc.ErrorInfo.MetadataEntry",
                repeated=True,
            ),
        ],
        nested_type=[metadata_entry],
    )
    retry_info = descriptor_pb2.DescriptorProto(
        name="RetryInfo",
        field=[
            _field("retry_delay", 1, _FieldProto.TYPE_MESSAGE, type_name=".google.protobuf.Duration"),
        ],
    )
    return descriptor_pb2.FileDescriptorProto(
        name="google/rpc/error_details.proto",
        package="google.rpc",
        syntax="proto3",
        dependency=["google/protobuf/duration.proto"],
        message_type=[error_info, retry_info],
    )


def _well_known_file(descriptor: object) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    descriptor.CopyToProto(proto)  # type: ignore[attr-defined]
    return proto


_POOL = descriptor_pool.DescriptorPool()
for _file in (
    _well_known_file(any_pb2.DESCRIPTOR),
    _well_known_file(duration_pb2.DESCRIPTOR),
    _status_file(),
    _error_details_file(),
):
    _POOL.Add(_file)


def _message_class(full_name: str) -> type[Message]:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(full_name))


_STATUS_CLASS = _message_class("google.rpc.Status")
_ERROR_INFO_CLASS = _message_class("google.rpc.ErrorInfo")
_RETRY_INFO_CLASS = _message_class("google.rpc.RetryInfo")


# The dynamic classes are typed as plain Message; these describe their fields.
class _AnyFields(Protocol):
    type_url: str
    value: bytes


class _StatusFields(Protocol):
    code: int
    message: str
    details: Sequence[_AnyFields]


class _ErrorInfoFields(Protocol):
    reason: str
    domain: str
    metadata: Mapping[str, str]


class _DurationFields(Protocol):
    seconds: int
    nanos: int


class _RetryInfoFields(Protocol):
    retry_delay: _DurationFields

    def HasField(self, field_name: str) -> bool: ...


@dataclass(frozen=True)
class StatusDetails:
    """What a google.rpc.Status says beyond the gRPC status code and message."""

    code: int
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_delay: datetime.timedelta | None = None


def parse_status(data: bytes) -> StatusDetails | None:
    """Decode a serialized google.rpc.Status; None when the bytes are not one."""
    try:
        status = cast(_StatusFields, _STATUS_CLASS.FromString(data))
        reason = domain = ""
        metadata: dict[str, str] = {}
        retry_delay: datetime.timedelta | None = None
        for detail in status.details:
            if detail.type_url == ERROR_INFO_TYPE_URL:
                info = cast(_ErrorInfoFields, _ERROR_INFO_CLASS.FromString(detail.value))
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.type_url == RETRY_INFO_TYPE_URL:
                retry = cast(_RetryInfoFields, _RETRY_INFO_CLASS.FromString(detail.value))
                if retry.HasField("retry_delay"):
                    delay = retry.retry_delay
                    retry_delay = datetime.timedelta(seconds=delay.seconds, microseconds=delay.nanos // 1000)
    except DecodeError:
        return None
    return StatusDetails(
        code=status.code,
        message=status.message,
        reason=reason,
        domain=domain,
        metadata=metadata,
        retry_delay=retry_delay,
    )


def status_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> StatusDetails | None:
    """Find and decode `grpc-status-details-bin` in trailing metadata."""
    for key, value in metadata or ():
        if key == DETAILS_METADATA_KEY and isinstance(value, bytes):
            return parse_status(value)
    return None
