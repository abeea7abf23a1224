"""The SDK decodes the server's google.rpc.Status without googleapis-common-protos.

The reference encoder is googleapis-common-protos itself (what the server uses
through grpcio-status), so these tests prove the SDK's hand-written
descriptors read the same bytes.
"""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from twofactor import _status, errors

DOMAIN = "twofactor.v1"


def pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def rich_status(
    code: grpc.StatusCode,
    message: str,
    reason: str = "",
    metadata: dict[str, str] | None = None,
    retry_delay: duration_pb2.Duration | None = None,
) -> bytes:
    details = []
    if reason:
        details.append(pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)))
    if retry_delay is not None:
        details.append(pack(error_details_pb2.RetryInfo(retry_delay=retry_delay)))
    return status_pb2.Status(code=code.value[0], message=message, details=details).SerializeToString()


def trailing(data: bytes) -> tuple[tuple[str, str | bytes], ...]:
    return (("x-other", "1"), (_status.DETAILS_METADATA_KEY, data), ("x-other-bin", b"\x00"))


def test_reads_error_info_and_retry_info_encoded_by_googleapis() -> None:
    data = rich_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "wait before sending another code",
        "RESEND_TOO_SOON",
        {"method": "email", "limit": "1"},
        duration_pb2.Duration(seconds=12, nanos=250_000_000),
    )

    details = _status.parse_status(data)

    assert details == _status.StatusDetails(
        code=8,
        message="wait before sending another code",
        reason="RESEND_TOO_SOON",
        domain=DOMAIN,
        metadata={"method": "email", "limit": "1"},
        retry_delay=datetime.timedelta(seconds=12, milliseconds=250),
    )


def test_status_without_details() -> None:
    data = status_pb2.Status(code=14, message="down").SerializeToString()

    assert _status.parse_status(data) == _status.StatusDetails(code=14, message="down")


def test_unknown_detail_types_are_skipped() -> None:
    data = status_pb2.Status(
        code=3,
        message="bad",
        details=[
            pack(error_details_pb2.DebugInfo(detail="stack")),
            pack(error_details_pb2.ErrorInfo(reason="INVALID_CODE", domain=DOMAIN)),
            pack(error_details_pb2.BadRequest()),
        ],
    ).SerializeToString()

    details = _status.parse_status(data)

    assert details is not None
    assert (details.reason, details.domain, details.retry_delay) == ("INVALID_CODE", DOMAIN, None)


def test_retry_info_without_delay_gives_none() -> None:
    data = status_pb2.Status(code=8, details=[pack(error_details_pb2.RetryInfo())]).SerializeToString()

    details = _status.parse_status(data)

    assert details is not None
    assert details.retry_delay is None


def test_garbage_is_not_a_status() -> None:
    assert _status.parse_status(b"\xff\xff\xff") is None


def test_finds_the_details_key_in_trailing_metadata() -> None:
    data = rich_status(grpc.StatusCode.NOT_FOUND, "no such user", "USER_NOT_FOUND")

    details = _status.status_from_metadata(trailing(data))

    assert details is not None
    assert details.reason == "USER_NOT_FOUND"
    assert _status.status_from_metadata((("x-other", "1"),)) is None
    assert _status.status_from_metadata(None) is None


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_USER_ID", errors.InvalidArgument),
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CODE", errors.InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND", errors.NotFound),
        (grpc.StatusCode.NOT_FOUND, "CHALLENGE_NOT_FOUND", errors.NotFound),
        (grpc.StatusCode.FAILED_PRECONDITION, "NOT_ENROLLED", errors.NotEnrolled),
        (grpc.StatusCode.FAILED_PRECONDITION, "METHOD_NOT_ENABLED", errors.NotEnrolled),
        (grpc.StatusCode.FAILED_PRECONDITION, "NO_PENDING_ENROLLMENT", errors.NotEnrolled),
        (grpc.StatusCode.FAILED_PRECONDITION, "METHOD_NOT_ALLOWED", errors.MethodNotAllowed),
        (grpc.StatusCode.FAILED_PRECONDITION, "CONTACT_MISSING", errors.ContactMissing),
        (grpc.StatusCode.FAILED_PRECONDITION, "LAST_METHOD_REQUIRED", errors.LastMethodRequired),
        (grpc.StatusCode.FAILED_PRECONDITION, "ADMIN_RESET_DISABLED", errors.AdminResetDisabled),
        (grpc.StatusCode.FAILED_PRECONDITION, "USER_LOCKED", errors.UserLocked),
        (grpc.StatusCode.FAILED_PRECONDITION, "SOMETHING_NEW", errors.FailedPrecondition),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESEND_TOO_SOON", errors.RateLimited),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "USER_SEND_LIMIT", errors.RateLimited),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "DESTINATION_SEND_LIMIT", errors.RateLimited),
        (grpc.StatusCode.UNAVAILABLE, "BROKER_UNAVAILABLE", errors.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", errors.DeadlineExceeded),
        (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN", errors.Unauthenticated),
        (grpc.StatusCode.PERMISSION_DENIED, "SCOPE_REQUIRED", errors.PermissionDenied),
        (grpc.StatusCode.INTERNAL, "", errors.TwoFactorError),
        (grpc.StatusCode.UNKNOWN, "", errors.TwoFactorError),
        (grpc.StatusCode.ALREADY_EXISTS, "", errors.TwoFactorError),
    ],
)
def test_exception_class_by_code_and_reason(
    code: grpc.StatusCode, reason: str, expected: type[errors.TwoFactorError]
) -> None:
    data = rich_status(code, "it failed", reason)

    error = errors.error_from_status(code, "it failed", trailing(data), request_id="req-1")

    assert type(error) is expected
    assert isinstance(error, errors.TwoFactorError)
    assert (error.code, error.message, error.reason, error.request_id) == (code, "it failed", reason, "req-1")
    assert error.domain == (DOMAIN if reason else "")


def test_failed_precondition_subclasses_are_caught_as_failed_precondition() -> None:
    data = rich_status(grpc.StatusCode.FAILED_PRECONDITION, "x", "LAST_METHOD_REQUIRED")

    with pytest.raises(errors.FailedPrecondition):
        raise errors.error_from_status(grpc.StatusCode.FAILED_PRECONDITION, "x", trailing(data))


def test_contact_missing_names_the_contact() -> None:
    data = rich_status(
        grpc.StatusCode.FAILED_PRECONDITION, "register a phone", "CONTACT_MISSING", {"contact": "phone"}
    )

    error = errors.error_from_status(grpc.StatusCode.FAILED_PRECONDITION, "register a phone", trailing(data))

    assert isinstance(error, errors.ContactMissing)
    assert error.contact == "phone"
    assert error.metadata == {"contact": "phone"}


def test_rate_limited_carries_retry_after() -> None:
    data = rich_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "too soon",
        "RESEND_TOO_SOON",
        retry_delay=duration_pb2.Duration(seconds=29, nanos=1_000),
    )

    error = errors.error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "too soon", trailing(data))

    assert isinstance(error, errors.RateLimited)
    assert error.retry_after == datetime.timedelta(seconds=29, microseconds=1)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("SERVER: Received message larger than max (70009 vs. 65536)", errors.RequestTooLarge),
        ("Received message larger than max (70009 vs. 65536)", errors.RequestTooLarge),  # older grpc
        ("CLIENT: Sent message larger than max (70009 vs. 1024)", errors.RequestTooLarge),
        # The response past the client's own receive limit: the request was fine.
        ("CLIENT: Received message larger than max (5000000 vs. 4194304)", errors.RateLimited),
        ("2 streams are open on this server, the most at once; retry later", errors.RateLimited),
    ],
)
def test_grpcs_size_refusal_is_request_too_large_not_a_rate_limit(
    message: str, expected: type[errors.TwoFactorError]
) -> None:
    """RESOURCE_EXHAUSTED without a reason is either gRPC's size refusal (waiting never helps) or
    the open streams' cap (it does); only the status message tells them apart."""
    error = errors.error_from_status(grpc.StatusCode.RESOURCE_EXHAUSTED, message, None)

    assert type(error) is expected
    assert isinstance(error, errors.InvalidArgument) is (expected is errors.RequestTooLarge)


def test_without_details_the_code_still_picks_the_class() -> None:
    error = errors.error_from_status(grpc.StatusCode.FAILED_PRECONDITION, "no details", (("a", "b"),))

    assert type(error) is errors.FailedPrecondition
    assert (error.reason, error.metadata, error.retry_after) == ("", {}, None)


def test_message_names_code_and_reason() -> None:
    data = rich_status(grpc.StatusCode.NOT_FOUND, "no such user", "USER_NOT_FOUND")

    error = errors.error_from_status(grpc.StatusCode.NOT_FOUND, "no such user", trailing(data))

    assert str(error) == "NOT_FOUND: no such user (USER_NOT_FOUND)"


@pytest.mark.parametrize("googleapis_first", [True, False])
def test_private_pool_coexists_with_googleapis_common_protos(googleapis_first: bool) -> None:
    """Both register google.rpc.Status; neither import order may fail or mix the classes."""
    sdk = "from twofactor import _status"
    googleapis = "from google.rpc import status_pb2, error_details_pb2"
    script = textwrap.dedent(
        f"""
        {googleapis if googleapis_first else sdk}
        {sdk if googleapis_first else googleapis}
        from google.protobuf import any_pb2
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason="R", domain="d", metadata={{"k": "v"}}))
        data = status_pb2.Status(code=9, message="m", details=[info]).SerializeToString()
        details = _status.parse_status(data)
        assert (details.reason, details.metadata) == ("R", {{"k": "v"}}), details
        assert status_pb2.Status.FromString(data).details[0].Is(error_details_pb2.ErrorInfo.DESCRIPTOR)
        print("ok")
        """
    )

    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def readme_error_rows() -> dict[str, bool]:
    """The README's errors table, in order: each exception named in it, and whether its row is
    marked ↳ (a subclass of the nearest unmarked row above it)."""
    readme = (Path(__file__).parents[2] / "clients/python/README.md").read_text()
    rows = re.findall(r"^\| (↳ )?`(\w+)` \|", readme, re.MULTILINE)
    return {name: bool(arrow) for arrow, name in rows}


def test_the_readme_errors_table_names_every_exception_class() -> None:
    exported = {
        name
        for name in errors.__all__
        if isinstance(getattr(errors, name), type)
        and issubclass(getattr(errors, name), errors.TwoFactorError)
    }
    rows = readme_error_rows()

    assert exported - set(rows) == set(), "add these to the errors table of clients/python/README.md"
    assert set(rows) <= exported
    parent: type[errors.TwoFactorError] = errors.TwoFactorError
    for name, arrow in rows.items():
        subclass = getattr(errors, name)
        if not arrow:
            parent = subclass
        assert subclass.__bases__ == ((parent,) if arrow else (errors.TwoFactorError,)) or (
            subclass is errors.TwoFactorError
        ), name
