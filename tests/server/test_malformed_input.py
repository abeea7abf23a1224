"""Every RPC with malformed input answers its documented status and reason, never INTERNAL or UNKNOWN."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Harness, ServerFactory
from tests.server.helpers import AUTHENTICATOR, EMAIL, SMS, error_info
from twofactor_server.api import requests
from twofactor_server.domain.errors import InvalidArgument

INVALID = grpc.StatusCode.INVALID_ARGUMENT
LONG_ID = "u" * 257
UNKNOWN_METHOD = 99

# (service, RPC, request, expected status, expected ErrorInfo reason)
CASES: list[tuple[str, str, Message, grpc.StatusCode, str]] = [
    ("app", "GetStatus", pb.GetStatusRequest(user_id=""), INVALID, "INVALID_USER_ID"),
    ("app", "GetStatus", pb.GetStatusRequest(user_id=LONG_ID), INVALID, "INVALID_USER_ID"),
    ("app", "GetStatus", pb.GetStatusRequest(user_id="é" * 129), INVALID, "INVALID_USER_ID"),  # 258 bytes
    ("app", "GetStatus", pb.GetStatusRequest(user_id="bad\nid"), INVALID, "INVALID_USER_ID"),
    ("app", "SetContact", pb.SetContactRequest(user_id=""), INVALID, "INVALID_USER_ID"),
    ("app", "SetContact", pb.SetContactRequest(user_id="a", email="not-an-email"), INVALID, "INVALID_EMAIL"),
    ("app", "SetContact", pb.SetContactRequest(user_id="a", email="a@b"), INVALID, "INVALID_EMAIL"),
    ("app", "SetContact", pb.SetContactRequest(user_id="a", phone="4155550123"), INVALID, "INVALID_PHONE"),
    ("app", "SetContact", pb.SetContactRequest(user_id="a", phone="+0123456789"), INVALID, "INVALID_PHONE"),
    (
        "app",
        "SetContact",
        pb.SetContactRequest(user_id="a", phone="+1415555012345678"),
        INVALID,
        "INVALID_PHONE",
    ),
    (
        "app",
        "StartEnrollment",
        pb.StartEnrollmentRequest(user_id="", method=AUTHENTICATOR),
        INVALID,
        "INVALID_USER_ID",
    ),
    ("app", "StartEnrollment", pb.StartEnrollmentRequest(user_id="a"), INVALID, "INVALID_METHOD"),
    (
        "app",
        "StartEnrollment",
        pb.StartEnrollmentRequest(
            user_id="a", method=AUTHENTICATOR, qr_formats=[pb.QR_CODE_FORMAT_UNSPECIFIED]
        ),
        INVALID,
        "INVALID_QR_CODE_FORMAT",
    ),
    (
        "app",
        "StartEnrollment",
        pb.StartEnrollmentRequest(user_id="a", method=UNKNOWN_METHOD),
        INVALID,
        "INVALID_METHOD",
    ),
    (
        "app",
        "StartEnrollment",
        pb.StartEnrollmentRequest(user_id="a", method=AUTHENTICATOR, account_name="x" * 300),
        INVALID,
        "INVALID_ACCOUNT_NAME",
    ),
    (
        "app",
        "StartEnrollment",
        pb.StartEnrollmentRequest(user_id="a", method=AUTHENTICATOR, account_name="Evil Corp:alice"),
        INVALID,
        "INVALID_ACCOUNT_NAME",
    ),
    (
        "app",
        "StartEnrollment",
        pb.StartEnrollmentRequest(user_id="a", method=EMAIL, locale="x" * 64),
        INVALID,
        "INVALID_LOCALE",
    ),
    (
        "app",
        "ConfirmEnrollment",
        pb.ConfirmEnrollmentRequest(user_id="a", method=AUTHENTICATOR, code=""),
        INVALID,
        "INVALID_CODE",
    ),
    (
        "app",
        "ConfirmEnrollment",
        pb.ConfirmEnrollmentRequest(user_id="a", method=AUTHENTICATOR, code="12ab56"),
        INVALID,
        "INVALID_CODE",
    ),
    (
        "app",
        "ConfirmEnrollment",
        pb.ConfirmEnrollmentRequest(user_id="a", method=AUTHENTICATOR, code="12345"),
        INVALID,
        "INVALID_CODE",
    ),
    (
        "app",
        "ConfirmEnrollment",
        pb.ConfirmEnrollmentRequest(user_id="a", method=0, code="123456"),
        INVALID,
        "INVALID_METHOD",
    ),
    (
        "app",
        "DisableMethod",
        pb.DisableMethodRequest(user_id="a", method=UNKNOWN_METHOD),
        INVALID,
        "INVALID_METHOD",
    ),
    (
        "app",
        "DisableMethod",
        pb.DisableMethodRequest(user_id=LONG_ID, method=SMS),
        INVALID,
        "INVALID_USER_ID",
    ),
    ("app", "SendCode", pb.SendCodeRequest(user_id="a", method=0), INVALID, "INVALID_METHOD"),
    (
        "app",
        "SendCode",
        pb.SendCodeRequest(user_id="a", method=EMAIL, idempotency_key="k" * 129),
        INVALID,
        "INVALID_IDEMPOTENCY_KEY",
    ),
    (
        "app",
        "GetChallenge",
        pb.GetChallengeRequest(user_id="a", challenge_id=""),
        INVALID,
        "INVALID_CHALLENGE_ID",
    ),
    ("app", "GetChallenge", pb.GetChallengeRequest(user_id="", challenge_id="c"), INVALID, "INVALID_USER_ID"),
    ("app", "Verify", pb.VerifyRequest(user_id="a", code=""), INVALID, "INVALID_CODE"),
    ("app", "Verify", pb.VerifyRequest(user_id="a", code="12345"), INVALID, "INVALID_CODE"),
    (
        "app",
        "Verify",
        pb.VerifyRequest(user_id="a", code="\uff11\uff12\uff13\uff14\uff15\uff16"),
        INVALID,
        "INVALID_CODE",
    ),  # full-width digits
    ("app", "Verify", pb.VerifyRequest(user_id="a", code="x" * 10_000), INVALID, "INVALID_CODE"),
    ("app", "Verify", pb.VerifyRequest(user_id="a", code="'; DROP TABLE users; --"), INVALID, "INVALID_CODE"),
    ("app", "Verify", pb.VerifyRequest(user_id="", code="123456"), INVALID, "INVALID_USER_ID"),
    ("app", "GetBackupCodes", pb.GetBackupCodesRequest(user_id=""), INVALID, "INVALID_USER_ID"),
    (
        "app",
        "RegenerateBackupCodes",
        pb.RegenerateBackupCodesRequest(user_id=LONG_ID),
        INVALID,
        "INVALID_USER_ID",
    ),
    ("admin", "GetUser", admin_pb.GetUserRequest(user_id=""), INVALID, "INVALID_USER_ID"),
    ("admin", "ListUsers", admin_pb.ListUsersRequest(page_size=-1), INVALID, "INVALID_PAGE_SIZE"),
    ("admin", "ListUsers", admin_pb.ListUsersRequest(page_size=1001), INVALID, "INVALID_PAGE_SIZE"),
    ("admin", "ListUsers", admin_pb.ListUsersRequest(page_token="garbage!"), INVALID, "INVALID_PAGE_TOKEN"),
    ("admin", "ListUsers", admin_pb.ListUsersRequest(filter=7), INVALID, "INVALID_FILTER"),
    ("admin", "ResetUser", admin_pb.ResetUserRequest(user_id="a", reason=""), INVALID, "INVALID_REASON"),
    (
        "admin",
        "ResetUser",
        admin_pb.ResetUserRequest(user_id="", reason="lost phone"),
        INVALID,
        "INVALID_USER_ID",
    ),
    ("admin", "UnlockUser", admin_pb.UnlockUserRequest(user_id=LONG_ID), INVALID, "INVALID_USER_ID"),
    (
        "admin",
        "ListAuditEvents",
        admin_pb.ListAuditEventsRequest(page_token="ZTpub3RhbnVtYmVy"),
        INVALID,
        "INVALID_PAGE_TOKEN",
    ),
    (
        "admin",
        "ListAuditEvents",
        admin_pb.ListAuditEventsRequest(user_id=LONG_ID),
        INVALID,
        "INVALID_USER_ID",
    ),
    (
        "app",
        "ConfirmContact",
        pb.ConfirmContactRequest(user_id="known", method=AUTHENTICATOR, code="123456"),
        INVALID,
        "INVALID_METHOD",
    ),
    (
        "app",
        "ConfirmContact",
        pb.ConfirmContactRequest(user_id="known", method=EMAIL, code="12 34"),
        INVALID,
        "INVALID_CODE",
    ),
    # State, not shape: documented statuses other than INVALID_ARGUMENT.
    (
        "app",
        "ConfirmContact",
        pb.ConfirmContactRequest(user_id="ghost", method=EMAIL, code="123456"),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    ),
    (
        "app",
        "ConfirmContact",
        pb.ConfirmContactRequest(user_id="known", method=SMS, code="123456"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NO_PENDING_CONTACT_CHANGE",
    ),
    (
        "app",
        "ConfirmEnrollment",
        pb.ConfirmEnrollmentRequest(user_id="ghost", method=AUTHENTICATOR, code="123456"),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    ),
    (
        "app",
        "SendCode",
        pb.SendCodeRequest(user_id="ghost", method=EMAIL),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    ),
    (
        "app",
        "SendCode",
        pb.SendCodeRequest(user_id="known", method=AUTHENTICATOR),
        grpc.StatusCode.FAILED_PRECONDITION,
        "METHOD_HAS_NO_CODE_TO_SEND",
    ),
    (
        "app",
        "SendCode",
        pb.SendCodeRequest(user_id="known", method=EMAIL),
        grpc.StatusCode.FAILED_PRECONDITION,
        "METHOD_NOT_ENABLED",
    ),
    (
        "app",
        "StartEnrollment",
        pb.StartEnrollmentRequest(user_id="known", method=SMS),
        grpc.StatusCode.FAILED_PRECONDITION,
        "CONTACT_MISSING",
    ),
    (
        "app",
        "ConfirmEnrollment",
        pb.ConfirmEnrollmentRequest(user_id="known", method=SMS, code="123456"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NO_PENDING_ENROLLMENT",
    ),
    (
        "app",
        "DisableMethod",
        pb.DisableMethodRequest(user_id="known", method=SMS),
        grpc.StatusCode.FAILED_PRECONDITION,
        "METHOD_NOT_ENABLED",
    ),
    (
        "app",
        "GetChallenge",
        pb.GetChallengeRequest(user_id="known", challenge_id="nope"),
        grpc.StatusCode.NOT_FOUND,
        "CHALLENGE_NOT_FOUND",
    ),
    (
        "app",
        "GetBackupCodes",
        pb.GetBackupCodesRequest(user_id="known"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOT_ENROLLED",
    ),
    (
        "app",
        "RegenerateBackupCodes",
        pb.RegenerateBackupCodesRequest(user_id="ghost"),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    ),
    (
        "admin",
        "GetUser",
        admin_pb.GetUserRequest(user_id="ghost"),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    ),
    (
        "admin",
        "UnlockUser",
        admin_pb.UnlockUserRequest(user_id="ghost"),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    ),
    (
        "admin",
        "ResetUser",
        admin_pb.ResetUserRequest(user_id="ghost", reason="r"),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    ),
]


@pytest.mark.parametrize(
    ("service", "rpc", "request_message", "expected", "reason"),
    CASES,
    ids=[f"{c[1]}-{c[4]}-{i}" for i, c in enumerate(CASES)],
)
def test_malformed_input_gets_its_documented_status(
    harness: Harness, service: str, rpc: str, request_message: Message, expected: grpc.StatusCode, reason: str
) -> None:
    harness.twofactor.SetContact(pb.SetContactRequest(user_id="known"), metadata=harness.app_metadata)
    stub, metadata = (
        (harness.twofactor, harness.app_metadata)
        if service == "app"
        else (harness.admin, harness.admin_metadata)
    )
    with pytest.raises(grpc.RpcError) as raised:
        getattr(stub, rpc)(request_message, metadata=metadata, timeout=10)
    assert raised.value.code() == expected, raised.value.details()
    info = error_info(raised.value)
    assert info.reason == reason
    assert info.domain == "twofactor.v1"
    assert raised.value.details()  # a human-readable message, too


def test_every_rpc_has_a_malformed_input_case() -> None:
    covered = {rpc for _, rpc, *_ in CASES}
    for file in (pb, admin_pb):
        for service in file.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if method.name != "GetPolicy":  # takes no input at all
                    assert method.name in covered, f"{service.name}/{method.name} has no malformed-input case"


@pytest.mark.parametrize(
    ("with_token", "code", "reason"),
    [
        (True, INVALID, "MALFORMED_REQUEST"),
        # Without a token the answer is about the token, whatever the bytes (test_auth checks
        # that they are not even decoded).
        (False, grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN"),
    ],
)
def test_undecodable_request_bytes_are_not_internal(
    harness: Harness, with_token: bool, code: grpc.StatusCode, reason: str
) -> None:
    call = harness.channel.unary_unary(
        "/twofactor.v1.TwoFactorService/Verify",
        request_serializer=lambda raw: raw,
        response_deserializer=lambda raw: raw,
    )
    with pytest.raises(grpc.RpcError) as raised:
        call(b"\xff\xff\xff\xff", metadata=harness.app_metadata if with_token else None, timeout=10)
    assert raised.value.code() == code
    assert error_info(raised.value).reason == reason


@pytest.mark.parametrize("code", ["abcdef", "12"])
def test_a_malformed_code_is_invalid_whatever_the_policy(start_server: ServerFactory, code: str) -> None:
    """INVALID_ARGUMENT is for malformed input whatever the state: a method the policy does not
    allow does not turn a malformed code into METHOD_NOT_ALLOWED."""
    h = start_server(policy={"allowed_methods": ("authenticator",)})
    with pytest.raises(grpc.RpcError) as raised:
        h.twofactor.ConfirmEnrollment(
            pb.ConfirmEnrollmentRequest(user_id="x", method=EMAIL, code=code), metadata=h.app_metadata
        )
    assert (raised.value.code(), error_info(raised.value).reason) == (INVALID, "INVALID_CODE")


def refused(check: Callable[[], object]) -> str:
    with pytest.raises(InvalidArgument) as raised:
        check()
    return raised.value.reason


def test_every_documented_length_limit_is_inclusive() -> None:
    """The protos' limits, at their edges: the last length taken, the first refused."""
    assert (
        requests.user_id("é" * 128)
        and refused(lambda: requests.user_id("é" * 128 + "a")) == "INVALID_USER_ID"
    )
    assert requests.account_name("a" * 256) and refused(lambda: requests.account_name("a" * 257))
    assert requests.verification_token("t" * 256) and refused(lambda: requests.verification_token("t" * 257))
    assert requests.code("1" * 32) and refused(lambda: requests.code("1" * 33)) == "INVALID_CODE"
    assert requests.audit_actions(["a" * 64, "b"]) == ("a" * 64, "b")
    assert refused(lambda: requests.audit_actions(["a" * 65])) == "INVALID_AUDIT_FILTER"
    assert refused(lambda: requests.audit_actions([""])) == "INVALID_AUDIT_FILTER"
    fifty = [f"action_{i}" for i in range(50)]
    assert requests.audit_actions(fifty) == tuple(fifty)
    assert refused(lambda: requests.audit_actions([*fifty, "one_more"])) == "INVALID_AUDIT_FILTER"
    assert requests.MAX_REASON_BYTES == 1024  # admin_service.proto: "required, up to 1024 bytes"


def test_an_audit_time_range_keeps_its_milliseconds_and_the_timestamp_range() -> None:
    def at(seconds: int, nanos: int = 0) -> Timestamp:
        return Timestamp(seconds=seconds, nanos=nanos)

    assert requests.time_range(at(1_700_000_000, 999_999_999), None) == (1_700_000_000_999, None)
    assert requests.time_range(None, at(-1, 500_000_000)) == (None, -500)
    assert requests.time_range(at(5, 1_000_000), at(5, 2_000_000)) == (5001, 5002)
    assert refused(lambda: requests.time_range(at(5, 1_000_000), at(5, 1_999_999))) == "INVALID_AUDIT_FILTER"
    first, last = -62_135_596_800, 253_402_300_799  # 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z
    assert requests.time_range(at(first), at(last, 999_999_999)) == (first * 1000, last * 1000 + 999)
    for bad in (at(first - 1), at(last + 1), at(0, 1_000_000_000), at(0, -1)):
        assert refused(lambda bad=bad: requests.time_range(bad, None)) == "INVALID_AUDIT_FILTER"
