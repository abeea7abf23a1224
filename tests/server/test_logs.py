"""Log lines: JSON or text, each line of a call carrying its request id, method and token name; the
caller's request id comes back; and no code, secret or token ever reaches a log line."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import grpc
import pytest
import urllib3
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import ADMIN_TOKEN, APP_TOKEN, TEST_KEYS, Clock, ServerFactory
from tests.debug_logs import debug_logs
from tests.http_stub import serving
from tests.server.helpers import AUTHENTICATOR, EMAIL, enroll_authenticator, totp_now, verified_token, verify
from tests.smtp_sink import SmtpSink, code_in, free_port
from twofactor_server.observability import logs

TWOFACTOR = str(Path(sys.executable).with_name("twofactor"))


def test_a_callers_request_id_comes_back_and_one_is_made_when_absent(start_server: ServerFactory) -> None:
    h = start_server()
    _, call = h.twofactor.GetStatus.with_call(
        pb.GetStatusRequest(user_id="ann"), metadata=(*h.app_metadata, ("x-request-id", "req-42"))
    )
    assert ("x-request-id", "req-42") in call.initial_metadata()
    _, call = h.twofactor.GetStatus.with_call(pb.GetStatusRequest(user_id="ann"), metadata=h.app_metadata)
    made = dict(call.initial_metadata())["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    # A refused call carries it too, so the caller can quote it.
    with pytest.raises(grpc.RpcError) as refused:
        h.twofactor.GetStatus(pb.GetStatusRequest(user_id="ann"), metadata=(("x-request-id", "req-43"),))
    assert ("x-request-id", "req-43") in refused.value.initial_metadata()


def test_every_log_line_is_json_with_the_request_id_method_and_token(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    env.update(
        {
            "TWOFACTOR_LISTEN": f"127.0.0.1:{port}",
            "TWOFACTOR_DATA_DIR": str(tmp_path / "data"),
            "TWOFACTOR_KEYS": TEST_KEYS,
            "TWOFACTOR_TOKENS": f"backend:app:{hashlib.sha256(APP_TOKEN.encode()).hexdigest()}",
            "TWOFACTOR_LOG_FORMAT": "json",
            "TWOFACTOR_LOG_LEVEL": "DEBUG",
            "TWOFACTOR_LISTNE": "typo",  # warned about, as a JSON line too
        }
    )
    process = subprocess.Popen(
        [TWOFACTOR, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:  # ends if the process exits; pytest-timeout bounds it
            if "listening on" in line:
                break
        metadata = (("authorization", f"Bearer {APP_TOKEN}"), ("x-request-id", "trace-me-1"))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc_stub(channel)
            stub.GetStatus(pb.GetStatusRequest(user_id="ann"), metadata=metadata, timeout=30)
            with pytest.raises(grpc.RpcError):
                stub.Verify(pb.VerifyRequest(user_id="ann", code="123456"), metadata=metadata, timeout=30)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    lines = [line for line in stderr.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line parses
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert any("TWOFACTOR_LISTNE" in r["message"] and r["level"] == "WARNING" for r in records)
    calls = [r for r in records if r.get("request_id") == "trace-me-1"]
    methods = {r["method"] for r in calls}
    assert methods == {"/twofactor.v1.TwoFactorService/GetStatus", "/twofactor.v1.TwoFactorService/Verify"}
    assert all(r["token"] == "backend" for r in calls), calls
    # Every line written while a call was handled carries its request id.
    assert all("request_id" in r for r in records if "method" in r)


def pb_grpc_stub(channel: grpc.Channel):  # type: ignore[no-untyped-def]
    from twofactor.v1 import twofactor_service_pb2_grpc

    return twofactor_service_pb2_grpc.TwoFactorServiceStub(channel)


class Captured(logging.Handler):
    """Every record at DEBUG and above, formatted both ways, as the operators' handler would."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.addFilter(logs.ContextFilter())
        self._json = logs.JsonFormatter()
        self._text = logs.TextFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("mail.log"):
            return  # the test's own SMTP sink (aiosmtpd) logs the messages it receives
        self.lines.append(self._json.format(record))
        self.lines.append(self._text.format(record))


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_no_code_secret_or_token_reaches_a_log_line(
    start_server: ServerFactory, sink: SmtpSink, clock: Clock, captured: Captured
) -> None:
    """Every RPC, the failures too, with DEBUG logging on: the log holds none of what was exchanged."""
    h = start_server(email_provider="smtp", smtp=sink.settings())
    secrets_seen: list[str] = [APP_TOKEN, ADMIN_TOKEN]
    secret, backup = enroll_authenticator(h, clock, "zoe")
    secrets_seen += [secret, *backup]

    def fresh_token() -> str:  # a step-up proof, itself a secret
        code = totp_now(secret, clock)
        token = verified_token(h, clock, "zoe", secret)
        secrets_seen.extend((code, token))
        return token

    fresh_token()
    wrong = totp_now(secret, clock, offset_steps=5)
    secrets_seen.append(wrong)
    verify(h, "zoe", wrong)
    by_backup = verify(h, "zoe", backup[0])
    assert by_backup.result == pb.VERIFY_RESULT_ACCEPTED
    secrets_seen.append(by_backup.verification_token)

    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="zoe", email="zoe@example.com", verification_token=fresh_token()),
        metadata=h.app_metadata,
    )
    h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="zoe", method=EMAIL, verification_token=fresh_token()),
        metadata=h.app_metadata,
    )
    emailed = code_in(sink.wait_for_messages(1)[-1])
    secrets_seen.append(emailed)
    confirmed = h.twofactor.ConfirmEnrollment(
        pb.ConfirmEnrollmentRequest(user_id="zoe", method=EMAIL, code=emailed), metadata=h.app_metadata
    )
    secrets_seen += [confirmed.verification_token, *confirmed.backup_codes]
    clock.advance(31)
    sent = h.twofactor.SendCode(pb.SendCodeRequest(user_id="zoe", method=EMAIL), metadata=h.app_metadata)
    login_code = code_in(sink.wait_for_messages(2)[-1])
    secrets_seen.append(login_code)
    h.twofactor.GetChallenge(
        pb.GetChallengeRequest(user_id="zoe", challenge_id=sent.challenge.challenge_id),
        metadata=h.app_metadata,
    )
    by_email = verify(h, "zoe", login_code)
    assert by_email.result == pb.VERIFY_RESULT_ACCEPTED
    secrets_seen.append(by_email.verification_token)
    secrets_seen += h.twofactor.GetBackupCodes(
        pb.GetBackupCodesRequest(user_id="zoe", verification_token=fresh_token()), metadata=h.app_metadata
    ).codes
    secrets_seen += h.twofactor.RegenerateBackupCodes(
        pb.RegenerateBackupCodesRequest(user_id="zoe", verification_token=fresh_token()),
        metadata=h.app_metadata,
    ).codes
    h.twofactor.GetStatus(pb.GetStatusRequest(user_id="zoe"), metadata=h.app_metadata)
    h.twofactor.DisableMethod(
        pb.DisableMethodRequest(user_id="zoe", method=EMAIL, verification_token=fresh_token()),
        metadata=h.app_metadata,
    )
    code = totp_now(secret, clock)
    for rpc, request in (
        (h.admin.GetUser, admin_pb.GetUserRequest(user_id="zoe")),
        (h.admin.ListUsers, admin_pb.ListUsersRequest()),
        (h.admin.GetPolicy, admin_pb.GetPolicyRequest()),
        (h.admin.ListAuditEvents, admin_pb.ListAuditEventsRequest(user_id="zoe")),
        (h.admin.UnlockUser, admin_pb.UnlockUserRequest(user_id="zoe")),
        (h.admin.ResetUser, admin_pb.ResetUserRequest(user_id="zoe", reason="lost phone")),
    ):
        rpc(request, metadata=h.admin_metadata)
    # Refused calls: a wrong token, a malformed code, an app token on the admin service.
    for metadata in ((("authorization", f"Bearer {APP_TOKEN}x"),), h.app_metadata):
        with pytest.raises(grpc.RpcError):
            h.twofactor.Verify(pb.VerifyRequest(user_id="zoe", code=f"{code}x"), metadata=metadata)
    with pytest.raises(grpc.RpcError):
        h.admin.GetUser(admin_pb.GetUserRequest(user_id="zoe"), metadata=h.app_metadata)
    # After the reset: a new secret, its name the old one (what a careless client might send).
    again = h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="zoe", method=AUTHENTICATOR, account_name=secret),
        metadata=h.app_metadata,
    )
    secrets_seen.append(again.authenticator.secret)

    assert len(captured.lines) > 40  # DEBUG was on: every call wrote its line
    text = "\n".join(captured.lines)
    leaked = sorted({s for s in secrets_seen if s and s in text})
    where = [line for line in captured.lines if any(s in line for s in leaked)][:6]
    assert leaked == [], f"found in the logs: {leaked}: {where}"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_embedded_delivery_lines_carry_the_challenge_id(
    start_server: ServerFactory, captured: Captured
) -> None:
    """On the embedded default deliveries run in the server's threads: their lines name the
    challenge as a worker's do."""
    h = start_server()
    h.twofactor.SetContact(
        pb.SetContactRequest(user_id="lia", email="lia@example.com"), metadata=h.app_metadata
    )
    start = h.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(user_id="lia", method=EMAIL),
        metadata=h.app_metadata,
    )
    challenge_id = start.challenge.challenge_id
    deadline = time.monotonic() + 60
    delivered: list[dict[str, str]] = []
    while not delivered:
        assert time.monotonic() < deadline, "no delivery line was logged"
        lines = [json.loads(line) for line in list(captured.lines) if line.startswith("{")]
        delivered = [
            line for line in lines if line["logger"].endswith("deliverer") and "delivered" in line["message"]
        ]
        time.sleep(0.05)
    assert delivered[0].get("challenge_id") == challenge_id


class _Gateway(BaseHTTPRequestHandler):
    """An SMS gateway an operator's class calls with the text in the query string."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_debug_logs_hold_no_code_an_operators_sms_class_puts_in_a_url() -> None:
    """TWOFACTOR_LOG_LEVEL=DEBUG: urllib3 (requests' transport) logs each request's URL at DEBUG,
    httpx at INFO; a gateway called with the text in its query string would log the code."""
    code = "493817"
    with debug_logs() as stream, serving(_Gateway) as url:
        urllib3.PoolManager().request("GET", f"{url}/send?to=%2B14155550199&text=Your+code+is+{code}")
    lines = stream.getvalue().splitlines()
    assert any(json.loads(line)["level"] == "DEBUG" for line in lines)
    assert [line for line in lines if code in line] == []
