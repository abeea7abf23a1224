"""examples/web's step-up logic without a browser: the token passing that issue 12's server needs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import twofactor
from flask import Flask
from flask.testing import FlaskClient
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from twofactor import Method
from twofactor.v1 import twofactor_service_pb2 as tf_pb

from examples.web import step_up
from examples.web.app import create_app
from examples.web.settings import SiteSettings


def message_type_with_token(name: str) -> type[Message]:
    """A message like the ones issue 12 will change: user_id and a verification_token."""
    file = descriptor_pb2.FileDescriptorProto(
        name=f"step_up_test/{name}.proto", package="step_up_test", syntax="proto3"
    )
    message = file.message_type.add(name=name)
    for number, field in enumerate(("user_id", "verification_token"), start=1):
        message.field.add(
            name=field,
            number=number,
            type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"step_up_test.{name}"))


def sdk_call_with_token(*, user_id: str, verification_token: str = "") -> None: ...


def sdk_call_without_token(*, user_id: str) -> None: ...


def test_the_token_goes_only_where_the_request_and_the_sdk_take_it() -> None:
    request_with_token = message_type_with_token("GetBackupCodesRequest")
    assert step_up.token_argument(request_with_token, sdk_call_with_token, "t0k") == {
        "verification_token": "t0k"
    }
    assert step_up.token_argument(request_with_token, sdk_call_without_token, "t0k") == {}
    assert step_up.token_argument(request_with_token, sdk_call_with_token, "") == {}
    assert step_up.token_argument(tf_pb.GetStatusRequest, sdk_call_with_token, "t0k") == {}


def test_record_keeps_the_token_when_the_response_has_one(app: Flask) -> None:
    response_type = message_type_with_token("VerifyResponse")
    with app.test_request_context():
        step_up.record(response_type(verification_token="proof"))
        assert step_up.token() == "proof"
        assert step_up.is_fresh()
        step_up.record(tf_pb.VerifyResponse())  # a server without step-up tokens
        assert step_up.token() == ""
        assert step_up.is_fresh()


class StepUpServer:
    """Stands in for SecondFactor against a server that wants a newer token than the session's."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def status(self, user_id: str) -> tf_pb.GetStatusResponse:
        return tf_pb.GetStatusResponse(enabled_methods=[Method.METHOD_AUTHENTICATOR])

    def backup_codes(self, user_id: str, token: str) -> list[str]:
        self.calls.append(("backup_codes", token))
        raise twofactor.FailedPrecondition(
            grpc.StatusCode.FAILED_PRECONDITION, "a fresh second factor is required", "STEP_UP_REQUIRED"
        )

    def start_authenticator(self, user: Any, token: str) -> None:
        self.calls.append(("start_authenticator", token))
        raise twofactor.FailedPrecondition(
            grpc.StatusCode.FAILED_PRECONDITION, "a fresh second factor is required", "STEP_UP_REQUIRED"
        )

    def close(self) -> None:
        pass


@pytest.fixture
def server() -> StepUpServer:
    return StepUpServer()


@pytest.fixture
def app(server: StepUpServer) -> Flask:
    settings = SiteSettings(app_token="app", admin_token="admin", secret_key="test-secret")
    return create_app(settings, second_factor=server)  # type: ignore[arg-type]


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as client:
        yield client


def test_step_up_required_from_the_server_shows_the_prompt(client: FlaskClient, server: StepUpServer) -> None:
    with client.session_transaction() as session:
        session.update(
            user="alice", signed_in_at=time.time(), second_factor_at=time.time(), verification_token="stale"
        )

    response = client.get("/backup-codes")

    assert response.status_code == 302
    assert response.headers["Location"] == "/step-up?next=/backup-codes"
    assert server.calls == [("backup_codes", "stale")]
    with client.session_transaction() as session:
        assert "verification_token" not in session
        assert "second_factor_at" not in session


def test_a_form_without_a_page_of_its_own_returns_to_its_page_after_the_prompt(
    client: FlaskClient, server: StepUpServer
) -> None:
    with client.session_transaction() as session:
        session.update(
            user="alice",
            signed_in_at=time.time(),
            second_factor_at=time.time(),
            verification_token="spent",
            csrf="token",
        )

    response = client.post("/enroll/authenticator", data={"csrf_token": "token"})

    assert response.status_code == 302
    assert response.headers["Location"] == "/step-up?next=/enroll"  # POST /enroll/authenticator has no page
    assert server.calls == [("start_authenticator", "spent")]


def test_a_password_alone_cannot_add_a_method(client: FlaskClient, server: StepUpServer) -> None:
    """Half-way through a login, a user who has a method must pass it before enrolling another."""
    with client.session_transaction() as session:
        session.update(pending_user="alice", pending_since=time.time(), csrf="token")

    response = client.post("/enroll/authenticator", data={"csrf_token": "token"})

    assert response.status_code == 302
    assert response.headers["Location"] == "/login/verify"
    assert server.calls == []


class NoMethodServer:
    """A user who has no method enabled yet."""

    def status(self, user_id: str) -> tf_pb.GetStatusResponse:
        return tf_pb.GetStatusResponse()

    def close(self) -> None:
        pass


def change() -> str:
    return "changed"


def test_only_required_always_asks_a_user_who_has_no_method() -> None:
    """`required` lets them through (their first enrollment needs no proof); `required_always`
    (an operator's reset of somebody else) does not."""
    settings = SiteSettings(app_token="app", admin_token="admin", secret_key="test-secret")
    app = create_app(settings, second_factor=NoMethodServer())  # type: ignore[arg-type]
    app.add_url_rule("/own", "own", step_up.required(change))
    app.add_url_rule("/others", "others", step_up.required_always(change))
    with app.test_client() as client:
        with client.session_transaction() as session:
            session.update(user="carol")

        own, others = client.get("/own"), client.get("/others")

        assert (own.status_code, own.data) == (200, b"changed")
        assert others.status_code == 302
        assert others.headers["Location"] == "/step-up?next=/others"
        with client.session_transaction() as session:
            session["second_factor_at"] = time.time()
        assert client.get("/others").data == b"changed"
