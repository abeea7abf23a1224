"""The grpcurl path: everything an operator needs comes from server reflection, with no generated code.

This does what `grpcurl -plaintext -H 'authorization: Bearer …' -d '{"user_id":"alice","reason":"lost phone"}'
localhost:PORT twofactor.v1.AdminService/ResetUser` does: list the services, resolve the method through
reflection, build the request from JSON and call it.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.conftest import ADMIN_TOKEN, APP_TOKEN, Clock, Harness
from tests.server.helpers import error_info, totp_now

TIMEOUT = 10.0
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def grpcurl(
    channel: grpc.Channel,
    pool: descriptor_pool.DescriptorPool,
    full_method: str,
    body: str,
    metadata: tuple[tuple[str, str], ...],
) -> dict[str, Any]:
    """`grpcurl -d BODY target SERVICE/METHOD` using only descriptors the server sent."""
    service_name, _, method_name = full_method.rpartition("/")
    method = pool.FindServiceByName(service_name).methods_by_name[method_name]
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    request = json_format.Parse(body, request_class())
    rpc = channel.unary_unary(
        f"/{service_name}/{method_name}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    response = rpc(request, metadata=metadata, timeout=TIMEOUT)
    return json.loads(json_format.MessageToJson(response))


def test_the_readme_grpcurl_session_through_reflection_alone(harness: Harness, clock: Clock) -> None:
    app = (("authorization", f"Bearer {APP_TOKEN}"),)

    # grpcurl -plaintext localhost:PORT list (reflection needs no token)
    database = ProtoReflectionDescriptorDatabase(harness.channel)
    services = set(database.get_services())
    assert {"twofactor.v1.TwoFactorService", "twofactor.v1.AdminService", "grpc.health.v1.Health"} <= services

    # grpcurl -plaintext localhost:PORT describe twofactor.v1.AdminService
    pool = descriptor_pool.DescriptorPool(database)
    admin = pool.FindServiceByName("twofactor.v1.AdminService")
    methods = {m.name: (m.input_type.full_name, m.output_type.full_name) for m in admin.methods}
    assert methods == {
        "GetUser": ("twofactor.v1.GetUserRequest", "twofactor.v1.GetUserResponse"),
        "ListUsers": ("twofactor.v1.ListUsersRequest", "twofactor.v1.ListUsersResponse"),
        "ResetUser": ("twofactor.v1.ResetUserRequest", "twofactor.v1.ResetUserResponse"),
        "UnlockUser": ("twofactor.v1.UnlockUserRequest", "twofactor.v1.UnlockUserResponse"),
        "GetPolicy": ("twofactor.v1.GetPolicyRequest", "twofactor.v1.GetPolicyResponse"),
        "ListAuditEvents": ("twofactor.v1.ListAuditEventsRequest", "twofactor.v1.ListAuditEventsResponse"),
    }
    reset_request = pool.FindMessageTypeByName("twofactor.v1.ResetUserRequest")
    assert [f.name for f in reset_request.fields] == ["user_id", "reason"]
    # Imported files resolve too: User refers to google.protobuf.Timestamp and twofactor.v1.Method.
    user = pool.FindMessageTypeByName("twofactor.v1.User")
    assert user.fields_by_name["created_at"].message_type.full_name == "google.protobuf.Timestamp"
    assert user.fields_by_name["enabled_methods"].enum_type.full_name == "twofactor.v1.Method"

    # The app's calls from the README: enroll bob in an authenticator app and log in once.
    start = grpcurl(
        harness.channel,
        pool,
        "twofactor.v1.TwoFactorService/StartEnrollment",
        '{"user_id":"bob","method":"METHOD_AUTHENTICATOR","account_name":"bob@example.com"}',
        app,
    )
    secret = start["authenticator"]["secret"]
    assert start["authenticator"]["otpauthUri"].startswith("otpauth://totp/")
    confirm = grpcurl(
        harness.channel,
        pool,
        "twofactor.v1.TwoFactorService/ConfirmEnrollment",
        json.dumps({"user_id": "bob", "method": "METHOD_AUTHENTICATOR", "code": totp_now(secret, clock)}),
        app,
    )
    assert confirm["confirmed"] is True and len(confirm["backupCodes"]) == 10
    clock.advance(30)
    login = grpcurl(
        harness.channel,
        pool,
        "twofactor.v1.TwoFactorService/Verify",
        json.dumps({"user_id": "bob", "code": totp_now(secret, clock)}),
        app,
    )
    assert login["result"] == "VERIFY_RESULT_ACCEPTED" and login["matched"] == "CODE_KIND_AUTHENTICATOR"

    # grpcurl -plaintext -H "authorization: Bearer $ADMIN" -d '{"user_id":"bob","reason":"lost phone"}' \
    #   localhost:PORT twofactor.v1.AdminService/ResetUser
    reset = grpcurl(
        harness.channel,
        pool,
        "twofactor.v1.AdminService/ResetUser",
        '{"user_id":"bob","reason":"lost phone"}',
        (*ADMIN, ("x-request-id", "grpcurl-1")),
    )
    assert reset["user"]["userId"] == "bob"
    assert "enabledMethods" not in reset["user"] and "backupCodesRemaining" not in reset["user"]

    # The reset took: the app sees a user who must enroll again, and the operator sees it in the log.
    status = grpcurl(
        harness.channel, pool, "twofactor.v1.TwoFactorService/GetStatus", '{"user_id":"bob"}', app
    )
    assert "enabledMethods" not in status
    events = grpcurl(
        harness.channel, pool, "twofactor.v1.AdminService/ListAuditEvents", '{"user_id":"bob"}', ADMIN
    )
    newest = events["events"][0]
    assert (newest["action"], newest["actor"], newest["requestId"], newest["detail"]) == (
        "user_reset",
        "operator",
        "grpcurl-1",
        "lost phone",
    )
    # Like grpcurl, the request JSON may use either the proto field names or their lowerCamelCase JSON names.
    after = grpcurl(harness.channel, pool, "twofactor.v1.AdminService/GetUser", '{"userId":"bob"}', ADMIN)
    assert after["user"]["userId"] == "bob" and "enabledMethods" not in after["user"]
    policy = grpcurl(harness.channel, pool, "twofactor.v1.AdminService/GetPolicy", "{}", ADMIN)
    assert policy["policy"]["backupCodeCount"] == 10 and policy["policy"]["allowAdminReset"] is True


def test_reflection_calls_still_need_the_token(harness: Harness) -> None:
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(harness.channel))
    with pytest.raises(grpc.RpcError) as missing:
        grpcurl(
            harness.channel,
            pool,
            "twofactor.v1.AdminService/ResetUser",
            '{"user_id":"alice","reason":"lost phone"}',
            (),
        )
    assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(missing.value).reason == "MISSING_TOKEN"


def test_reflection_reports_an_unknown_symbol(harness: Harness) -> None:
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(harness.channel))
    with pytest.raises(KeyError):
        pool.FindServiceByName("twofactor.v1.NoSuchService")
