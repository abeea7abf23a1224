"""Request size: no twofactor request needs more than a few kilobytes, so the server takes at most
MAX_REQUEST_BYTES (RESOURCE_EXHAUSTED past it, before the token is looked at); gRPC's default of
4 MiB let callers without a token make the server hold megabytes per call."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from twofactor.v1 import admin_service_pb2 as admin_pb
from twofactor.v1 import twofactor_service_pb2 as pb

from tests.conftest import Harness
from tests.server.helpers import AUTHENTICATOR, error_info
from tests.server.serve_process import ServeProcess, serve_env
from tests.smtp_sink import SmtpSink, running_sink
from twofactor_server.app import MAX_REQUEST_BYTES

GET_STATUS = "/twofactor.v1.TwoFactorService/GetStatus"


def raw_call(channel: grpc.Channel, method: str = GET_STATUS) -> grpc.UnaryUnaryMultiCallable:
    """A call that sends the given bytes as they are (the client's own send limit lifted)."""
    return channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)


def status_request(user_id_bytes: int) -> bytes:
    """A GetStatusRequest whose user_id (field 1) is `user_id_bytes` long: far past its own limit,
    but what matters here is the size of the whole message."""
    return pb.GetStatusRequest(user_id="a" * user_id_bytes).SerializeToString()


def test_a_request_past_the_limit_is_refused_before_anything_else(harness: Harness) -> None:
    with grpc.insecure_channel(harness.target, options=[("grpc.max_send_message_length", -1)]) as channel:
        for metadata in ((), harness.app_metadata):
            with pytest.raises(grpc.RpcError) as raised:
                raw_call(channel)(status_request(MAX_REQUEST_BYTES), metadata=metadata, timeout=10)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value.details()


def test_the_largest_valid_requests_fit(harness: Harness) -> None:
    """Every field at its documented limit, the repeated ones included, is still taken."""
    app, admin = harness.app_metadata, harness.admin_metadata
    user = "u" * 256
    harness.twofactor.SetContact(
        pb.SetContactRequest(user_id=user, email=f"{'e' * 64}@{'d' * 60}.example.com", locale="x" * 35),
        metadata=app,
    )
    harness.twofactor.StartEnrollment(
        pb.StartEnrollmentRequest(
            user_id=user,
            method=AUTHENTICATOR,
            account_name="n" * 256,
            locale="x" * 35,
            qr_formats=[pb.QR_CODE_FORMAT_PNG, pb.QR_CODE_FORMAT_SVG] * 50,
        ),
        metadata=app,
    )
    events = harness.admin.ListAuditEvents(
        admin_pb.ListAuditEventsRequest(user_id=user, actions=[f"{i:02d}" + "a" * 62 for i in range(50)]),
        metadata=admin,
    )
    assert list(events.events) == []
    harness.admin.ResetUser(admin_pb.ResetUserRequest(user_id=user, reason="r" * 1024), metadata=admin)
    with pytest.raises(grpc.RpcError) as raised:  # a long field past its own limit: its own reason
        harness.twofactor.GetStatus(pb.GetStatusRequest(user_id="a" * 4096), metadata=app)
    assert error_info(raised.value).reason == "INVALID_USER_ID"


def resident_megabytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory in /proc")
def test_calls_without_a_token_cant_make_the_server_hold_megabytes_each(tmp_path: Path) -> None:
    """120 calls of almost 4 MiB each, at once, from a caller with no token: the server read every
    one whole before its handler refused it (UNAUTHENTICATED), and held them all meanwhile, about
    2 MiB of memory per call (250 MB here). Past the size limit alone, it still let each call's
    flow-control window grow (BDP probing) and buffered what the caller pushed into it (0.2 to
    1.7 MB a call); with neither, 1,000 such calls grow it by a few megabytes."""
    with running_sink(SmtpSink()) as sink:
        server = ServeProcess(serve_env(tmp_path / "data", "", sink))
        try:
            before = resident_megabytes(server.process.pid)
            options = [("grpc.max_send_message_length", -1)]
            with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
                request = status_request(4 * 1024 * 1024 - 64)
                calls = [raw_call(channel).future(request, timeout=60) for _ in range(120)]
                peak = before
                while not all(call.done() for call in calls):
                    peak = max(peak, resident_megabytes(server.process.pid))
                    time.sleep(0.01)  # a sample every 10 ms: a spin would take a core from the server
                codes = {call.exception().code() for call in calls}  # type: ignore[union-attr]
        finally:
            server.stop()
    assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert peak - before < 50, f"the server grew from {before} MB to {peak} MB"
