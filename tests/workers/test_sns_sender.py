"""SnsSmsSender against moto's SNS over real HTTP on 127.0.0.1."""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import pytest
from botocore.awsrequest import AWSResponse
from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.sns.models import sns_backends

from tests.debug_logs import debug_logs
from tests.http_stub import serving
from twofactor_server.delivery.providers import (
    DeliveryError,
    PermanentDeliveryError,
    SmsMessage,
    SnsSmsSender,
    TransientDeliveryError,
)
from twofactor_server.settings import SnsSettings

REGION = "eu-west-1"
CODE = "731954"
TEXT = f"Your Acme verification code is {CODE}. It expires in 10 minutes."


@pytest.fixture(autouse=True)
def _aws(aws_credentials: None) -> None:
    """Every test here talks to moto with dummy credentials (tests/conftest.py)."""


def capture_requests(sender: SnsSmsSender) -> list[dict[str, list[str]]]:
    """Record each Publish request body as it goes on the wire, to check what we sent."""
    bodies: list[dict[str, list[str]]] = []

    def record(request: Any, **_: Any) -> None:
        body = request.body.decode() if isinstance(request.body, bytes) else request.body
        bodies.append(urllib.parse.parse_qs(body))

    sender._client.meta.events.register("before-send.sns.Publish", record)
    return bodies


def test_publish_reaches_sns_with_number_text_and_transactional_type(moto_endpoint: str) -> None:
    sender = SnsSmsSender(SnsSettings(region=REGION, endpoint_url=moto_endpoint, sender_id="Acme"))
    sent = capture_requests(sender)

    message_id = sender.send_sms(SmsMessage(to="+14155550123", text=TEXT))

    # What moto's SNS recorded for this message id.
    phone, text = sns_backends[DEFAULT_ACCOUNT_ID][REGION].sms_messages[message_id]
    assert phone == "+14155550123"
    assert CODE in text
    # moto does not keep SMS attributes, so check them in the request that reached it.
    [body] = sent
    entry = "MessageAttributes.entry"
    attributes = {body[f"{entry}.{n}.Name"][0]: body[f"{entry}.{n}.Value.StringValue"][0] for n in (1, 2)}
    assert attributes == {"AWS.SNS.SMS.SMSType": "Transactional", "AWS.SNS.SMS.SenderID": "Acme"}


def test_sender_id_is_omitted_when_not_configured(moto_endpoint: str) -> None:
    sender = SnsSmsSender(SnsSettings(region=REGION, endpoint_url=moto_endpoint))
    sent = capture_requests(sender)

    sender.send_sms(SmsMessage(to="+14155550124", text=TEXT))

    names = {value[0] for key, value in sent[0].items() if key.endswith(".Name")}
    assert names == {"AWS.SNS.SMS.SMSType"}


# moto checks E.164 (its pattern lets a missing "+" through, so that case is not listed).
@pytest.mark.parametrize("number", ["+0123", "+1 415 555 0123", "+1415555012345678", "tel:+14155550123"])
def test_invalid_phone_number_is_permanent(moto_endpoint: str, number: str) -> None:
    sender = SnsSmsSender(SnsSettings(region=REGION, endpoint_url=moto_endpoint))

    with pytest.raises(PermanentDeliveryError, match="InvalidParameter") as caught:
        sender.send_sms(SmsMessage(to=number, text=TEXT))
    assert CODE not in caught.value.reason


def test_closed_endpoint_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The port is released: connecting is refused at once, with no botocore retries.
    sender = SnsSmsSender(SnsSettings(region=REGION, endpoint_url=f"http://127.0.0.1:{port}"))

    with pytest.raises(TransientDeliveryError, match="connection failed"):
        sender.send_sms(SmsMessage(to="+14155550123", text=TEXT))


@pytest.mark.parametrize(
    ("status", "code", "error"),
    [
        (400, "Throttling", TransientDeliveryError),
        (500, "InternalError", TransientDeliveryError),
        (503, "Unavailable", TransientDeliveryError),  # unknown code, but a 5xx
        (403, "AuthorizationError", PermanentDeliveryError),
        (400, "OptedOut", PermanentDeliveryError),
    ],
)
def test_error_replies_map_to_retry_or_give_up(
    moto_endpoint: str, status: int, code: str, error: type[DeliveryError]
) -> None:
    """SNS error replies moto cannot be made to send, parsed by botocore as if from AWS.

    A before-send hook answers in place of the HTTP call; botocore's parser and
    error handling, and our mapping, run as they would against AWS.
    """
    sender = SnsSmsSender(SnsSettings(region=REGION, endpoint_url=moto_endpoint))
    xml = (
        f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code>"
        "<Message>Refused</Message></Error><RequestId>r</RequestId></ErrorResponse>"
    ).encode()

    def reply(**_: Any) -> AWSResponse:
        return AWSResponse(moto_endpoint, status, {}, _RawBody(xml))

    sender._client.meta.events.register("before-send.sns.Publish", reply)

    with pytest.raises(error) as caught:
        sender.send_sms(SmsMessage(to="+14155550123", text=TEXT))
    assert caught.value.reason == f"SNS {code}: Refused"


class _RawBody:
    """The part of a urllib3 response that AWSResponse reads."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing in boto3's chain answers: no AWS_* variables, empty shared files, no instance metadata."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    empty = tmp_path / "aws-empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_missing_credentials_are_transient_and_looked_up_again_at_the_next_send(
    moto_endpoint: str,
    no_credentials: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker started before its instance or container role answered: it retries, then sends."""
    sender = SnsSmsSender(SnsSettings(region=REGION, endpoint_url=moto_endpoint))

    with (
        caplog.at_level(logging.WARNING, logger="twofactor_server"),
        pytest.raises(TransientDeliveryError) as caught,
    ):
        sender.send_sms(SmsMessage(to="+14155550125", text=TEXT))
    assert caught.value.reason.startswith("SNS: no AWS credentials found (environment, shared file, ")
    assert "give the worker AWS credentials or an IAM role" in caught.value.reason
    assert [r.getMessage() for r in caplog.records if r.name.endswith(".sns")] == [caught.value.reason]

    # The credentials arrive (the role answers now): the same sender finds them.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    message_id = sender.send_sms(SmsMessage(to="+14155550125", text=TEXT))

    assert sns_backends[DEFAULT_ACCOUNT_ID][REGION].sms_messages[message_id] == ("+14155550125", TEXT)


class ContainerRole(BaseHTTPRequestHandler):
    """The container credentials endpoint (ECS task role, EKS Pod Identity), not ready at first."""

    ready = False
    asked = 0

    def do_GET(self) -> None:
        type(self).asked += 1
        if not type(self).ready:
            self.send_response(503)
            self.end_headers()
            return
        expiration = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
        body = {
            "AccessKeyId": "testing",
            "SecretAccessKey": "testing",
            "Token": "testing",
            "Expiration": expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def container_role(no_credentials: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[type[ContainerRole]]:
    ContainerRole.ready = False
    ContainerRole.asked = 0
    with serving(ContainerRole) as url:
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"{url}/creds")
        yield ContainerRole


def test_a_container_role_not_ready_at_start_is_retried_until_it_answers(
    moto_endpoint: str, container_role: type[ContainerRole]
) -> None:
    """The worker starts (no ProviderConfigError), retries while the role endpoint refuses, then sends."""
    sender = SnsSmsSender(SnsSettings(region=REGION, endpoint_url=moto_endpoint))

    with pytest.raises(TransientDeliveryError) as caught:
        sender.send_sms(SmsMessage(to="+14155550126", text=TEXT))
    assert caught.value.reason.startswith("SNS: AWS credentials could not be retrieved from container-role; ")
    asked_while_not_ready = container_role.asked

    container_role.ready = True
    message_id = sender.send_sms(SmsMessage(to="+14155550126", text=TEXT))

    assert sns_backends[DEFAULT_ACCOUNT_ID][REGION].sms_messages[message_id] == ("+14155550126", TEXT)
    assert container_role.asked > asked_while_not_ready


def test_debug_logs_hold_no_texted_code_no_phone_number_and_no_session_token(
    moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TWOFACTOR_LOG_LEVEL=DEBUG, as serve and worker configure it: botocore would log the
    Publish parameters and the signed request (with the session token); it stays at INFO."""
    monkeypatch.setenv("AWS_SESSION_TOKEN", "review-session-token-secret")
    with debug_logs() as stream:
        sender = SnsSmsSender(SnsSettings(region=REGION, endpoint_url=moto_endpoint))
        sender.send_sms(SmsMessage(to="+14155550199", text=TEXT))
    lines = stream.getvalue().splitlines()
    assert any(json.loads(line)["level"] == "DEBUG" for line in lines)  # DEBUG was on
    secrets = (CODE, "14155550199", "review-session-token-secret")
    leaking = sorted({json.loads(line)["logger"] for line in lines if any(s in line for s in secrets)})
    assert leaking == []


class ExpiringSns(BaseHTTPRequestHandler):
    """SNS as AWS answers a request signed with expired session credentials (key OLDKEY)."""

    keys_seen: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        key = self.headers.get("Authorization", "").partition("Credential=")[2].partition("/")[0]
        type(self).keys_seen.append(key)
        if key == "OLDKEY":
            status, body = (
                403,
                "<ErrorResponse><Error><Type>Sender</Type><Code>ExpiredToken</Code>"
                "<Message>The security token included in the request is expired</Message></Error>"
                "<RequestId>r</RequestId></ErrorResponse>",
            )
        else:
            status, body = (
                200,
                '<PublishResponse xmlns="http://sns.amazonaws.com/doc/2010-03-31/"><PublishResult>'
                "<MessageId>renewed-1</MessageId></PublishResult><ResponseMetadata><RequestId>r"
                "</RequestId></ResponseMetadata></PublishResponse>",
            )
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def expiring_sns() -> Iterator[str]:
    ExpiringSns.keys_seen = []
    with serving(ExpiringSns) as url:
        yield url


def test_expired_session_credentials_are_retried_with_the_renewed_ones(
    expiring_sns: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Session credentials in the shared file, renewed there by a sidecar after the worker read
    them: SNS answers ExpiredToken, which is a retry (not a failed code), and the retry signs with
    the renewed ones."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    shared = tmp_path / "aws-credentials"
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(shared))
    shared.write_text(
        "[default]\naws_access_key_id = OLDKEY\naws_secret_access_key = old\naws_session_token = old\n"
    )
    sender = SnsSmsSender(SnsSettings(region=REGION, endpoint_url=expiring_sns))
    shared.write_text(
        "[default]\naws_access_key_id = NEWKEY\naws_secret_access_key = new\naws_session_token = new\n"
    )
    with pytest.raises(TransientDeliveryError) as caught:
        sender.send_sms(SmsMessage(to="+14155550199", text=TEXT))
    assert caught.value.reason.startswith("SNS ExpiredToken: ")
    assert sender.send_sms(SmsMessage(to="+14155550199", text=TEXT)) == "renewed-1"
    assert ExpiringSns.keys_seen == ["OLDKEY", "NEWKEY"]


def test_a_region_botocore_does_not_know_is_said_at_start(caplog: pytest.LogCaptureFixture) -> None:
    """Said, not refused (a region newer than botocore works); a known one, or moto's endpoint,
    says nothing."""
    with caplog.at_level(logging.WARNING, logger="twofactor_server"):
        SnsSmsSender(SnsSettings(region="eu-west-7"))
        SnsSmsSender(SnsSettings(region="eu-west-1"))
        SnsSmsSender(SnsSettings(region="xx-test-9", endpoint_url="http://127.0.0.1:1"))
    assert [r.getMessage() for r in caplog.records if r.name.endswith(".sns")] == [
        "TWOFACTOR_SNS_REGION eu-west-7 is no SNS region this botocore knows: if it is mistyped, "
        "every text fails; check it"
    ]
