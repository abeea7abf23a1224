"""The custom SMS class shown in README.md works as printed, against a local HTTP gateway."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from tests.http_stub import serving
from twofactor_server.delivery.providers import (
    PermanentDeliveryError,
    SmsMessage,
    TransientDeliveryError,
    build_sms_sender,
)
from twofactor_server.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


class Gateway(BaseHTTPRequestHandler):
    status = 200
    received: list[dict[str, object]] = []  # noqa: RUF012 - shared with the test

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append({"auth": self.headers["Authorization"], **body})
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"id": f"acme-{len(self.received)}"}).encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[str]:
    Gateway.received = []
    Gateway.status = 200
    with serving(Gateway) as url:
        yield f"{url}/sms"


@pytest.fixture
def acme_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gateway: str) -> None:
    found = re.search(r"```python\n(# acme_sms\.py\n.*?)```", README.read_text(), re.S)
    assert found, "README.md lost its SMS class example"
    (tmp_path / "acme_sms.py").write_text(found.group(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("ACME_SMS_URL", gateway)
    monkeypatch.setenv("ACME_SMS_API_KEY", "k-123")


def test_readme_sms_class_sends_through_the_gateway(acme_module: None) -> None:
    sender = build_sms_sender(Settings(sms_provider="acme_sms:AcmeSmsSender"))
    assert sender.send_sms(SmsMessage(to="+14155550123", text="Your code is 123456")) == "acme-1"
    assert Gateway.received == [{"auth": "Bearer k-123", "to": "+14155550123", "text": "Your code is 123456"}]


@pytest.mark.parametrize(
    ("status", "error"),
    [(503, TransientDeliveryError), (429, TransientDeliveryError), (400, PermanentDeliveryError)],
)
def test_readme_sms_class_maps_gateway_errors(acme_module: None, status: int, error: type[Exception]) -> None:
    Gateway.status = status
    sender = build_sms_sender(Settings(sms_provider="acme_sms:AcmeSmsSender"))
    with pytest.raises(error):
        sender.send_sms(SmsMessage(to="+14155550123", text="Your code is 123456"))
