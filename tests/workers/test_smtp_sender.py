"""SmtpEmailSender against a real aiosmtpd server on 127.0.0.1: plain, STARTTLS, implicit TLS, AUTH."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage as MimeMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.pki import issue, make_ca
from tests.smtp_sink import CountingController, free_port
from twofactor_server.delivery.providers import (
    DeliveryError,
    EmailMessage,
    PermanentDeliveryError,
    SmtpEmailSender,
    TransientDeliveryError,
)
from twofactor_server.settings import Settings, SmtpSettings

CODE = "482913"
MESSAGE = EmailMessage(
    to="ada@example.com",
    subject="Your Acme verification code",
    text=f"Your Acme verification code is {CODE}.",
    html=f"<p>Your Acme verification code is <b>{CODE}</b>.</p>",
)
USERNAME, PASSWORD = "relay-user", "relay-secret"


@dataclass
class Pki:
    ca_file: Path
    server_context: ssl.SSLContext


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost."""
    ca = make_ca("twofactor test CA")
    server = issue(ca, "localhost", server=True)
    directory = tmp_path_factory.mktemp("pki")
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(ca.cert_pem)
    cert_file = directory / "server.pem"
    cert_file.write_bytes(server.cert_pem)
    key_file = directory / "server.key"
    key_file.write_bytes(server.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return Pki(ca_file=ca_file, server_context=context)


@dataclass
class Handler:
    """Records accepted messages; optional canned replies make RCPT or DATA fail."""

    rcpt_reply: str | None = None
    data_reply: str | None = None
    received: list[tuple[Envelope, MimeMessage]] = field(default_factory=list)
    mail_reply_once: str | None = None
    rcpt_reply_once: str | None = None
    data_reply_once: str | None = None
    connections: int = 0

    def connection_opened(self) -> None:
        self.connections += 1

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.mail_reply_once:
            reply, self.mail_reply_once = self.mail_reply_once, None
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.rcpt_reply_once:
            reply, self.rcpt_reply_once = self.rcpt_reply_once, None
            return reply
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply_once:
            reply, self.data_reply_once = self.data_reply_once, None
            return reply
        if self.data_reply:
            return self.data_reply
        assert isinstance(envelope.content, bytes)
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(parsed, MimeMessage)
        self.received.append((envelope, parsed))
        return "250 Message accepted"


@dataclass
class Authenticator:
    """Checks one username/password and records the mechanism the client chose."""

    mechanisms: list[str] = field(default_factory=list)

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        self.mechanisms.append(mechanism)
        ok = isinstance(auth_data, LoginPassword) and auth_data == LoginPassword(
            USERNAME.encode(), PASSWORD.encode()
        )
        # handled=False: aiosmtpd then sends the 535 reply itself.
        return AuthResult(success=ok, handled=ok)


StartServer = Callable[..., tuple[Handler, int]]


@pytest.fixture
def smtp_server() -> Iterator[StartServer]:
    """Start aiosmtpd servers with the given options; all are stopped when the test ends."""
    controllers: list[Controller] = []

    def start(handler: Handler | None = None, **options: Any) -> tuple[Handler, int]:
        handler = handler or Handler()
        port = free_port()
        controller = CountingController(
            handler,
            hostname="127.0.0.1",
            port=port,
            server_hostname="mx.test",  # otherwise aiosmtpd looks up the FQDN
            ready_timeout=10,
            **options,
        )
        controller.start()
        handler.connections = 0  # start() connected once itself, to see the server answer
        controllers.append(controller)
        return handler, port

    yield start
    for controller in controllers:
        controller.stop()


def settings(port: int, **overrides: Any) -> SmtpSettings:
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "security": "none",
        "from_address": "Acme <security@acme.test>",
        "timeout_seconds": 5.0,
    }
    values.update(overrides)
    return SmtpSettings(**values)


def assert_delivered(handler: Handler, message_id: str) -> None:
    [(envelope, received)] = handler.received
    assert envelope.rcpt_tos == ["ada@example.com"]
    assert envelope.mail_from == "security@acme.test"
    assert received["To"] == "ada@example.com"
    assert received["From"] == "Acme <security@acme.test>"
    assert received["Subject"] == "Your Acme verification code"
    assert received["Message-ID"] == message_id
    assert received.get_content_type() == "multipart/alternative"
    text = received.get_body(preferencelist=("plain",))
    html = received.get_body(preferencelist=("html",))
    assert text is not None and html is not None
    assert CODE in text.get_content()
    assert f"<b>{CODE}</b>" in html.get_content()


def test_plain_smtp_delivers_text_and_html_parts(smtp_server: StartServer) -> None:
    handler, port = smtp_server()

    message_id = SmtpEmailSender(settings(port)).send_email(MESSAGE)

    assert message_id.startswith("<") and message_id.endswith("@acme.test>")
    assert_delivered(handler, message_id)


def test_starttls_verifies_the_server_with_the_configured_ca(smtp_server: StartServer, pki: Pki) -> None:
    handler, port = smtp_server(tls_context=pki.server_context, require_starttls=True)
    sender = SmtpEmailSender(settings(port, security="starttls", ca_file=str(pki.ca_file)))

    assert_delivered(handler, sender.send_email(MESSAGE))


def test_implicit_tls_verifies_the_server_with_the_configured_ca(smtp_server: StartServer, pki: Pki) -> None:
    handler, port = smtp_server(ssl_context=pki.server_context)
    sender = SmtpEmailSender(settings(port, security="tls", ca_file=str(pki.ca_file)))

    assert_delivered(handler, sender.send_email(MESSAGE))


def test_untrusted_server_certificate_is_permanent(smtp_server: StartServer, pki: Pki) -> None:
    handler, port = smtp_server(tls_context=pki.server_context, require_starttls=True)
    # No ca_file: the system store does not know our throwaway CA.
    sender = SmtpEmailSender(settings(port, security="starttls"))

    with pytest.raises(PermanentDeliveryError, match="certificate"):
        sender.send_email(MESSAGE)
    assert handler.received == []


def test_starttls_required_but_not_offered_is_permanent(smtp_server: StartServer, pki: Pki) -> None:
    handler, port = smtp_server()  # no tls_context: the server does not advertise STARTTLS
    sender = SmtpEmailSender(settings(port, security="starttls", ca_file=str(pki.ca_file)))

    with pytest.raises(PermanentDeliveryError, match="STARTTLS"):
        sender.send_email(MESSAGE)
    assert handler.received == []


def auth_server(smtp_server: StartServer, pki: Pki, security: str, **options: Any) -> tuple[Handler, int]:
    if security == "starttls":
        return smtp_server(
            tls_context=pki.server_context, require_starttls=True, auth_required=True, **options
        )
    # aiosmtpd only counts STARTTLS as TLS; the implicit-TLS socket is encrypted all the same.
    return smtp_server(ssl_context=pki.server_context, auth_require_tls=False, **options)


@pytest.mark.parametrize("security", ["starttls", "tls"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_with_username_and_password(
    smtp_server: StartServer, pki: Pki, security: str, mechanism: str
) -> None:
    authenticator = Authenticator()
    other = {"PLAIN": "LOGIN", "LOGIN": "PLAIN"}[mechanism]
    handler, port = auth_server(
        smtp_server, pki, security, authenticator=authenticator, auth_exclude_mechanism=[other]
    )
    sender = SmtpEmailSender(
        settings(port, security=security, ca_file=str(pki.ca_file), username=USERNAME, password=PASSWORD)
    )

    assert_delivered(handler, sender.send_email(MESSAGE))
    assert authenticator.mechanisms == [mechanism]


def test_wrong_password_is_permanent(smtp_server: StartServer, pki: Pki) -> None:
    handler, port = auth_server(smtp_server, pki, "starttls", authenticator=Authenticator())
    sender = SmtpEmailSender(
        settings(port, security="starttls", ca_file=str(pki.ca_file), username=USERNAME, password="wrong")
    )

    with pytest.raises(PermanentDeliveryError, match="authentication failed: 535") as caught:
        sender.send_email(MESSAGE)
    assert "wrong" not in caught.value.reason
    assert handler.received == []


@dataclass
class FailingFirst:
    """Answers the first `times` AUTH attempts with a temporary failure (an auth backend that is
    briefly down), then checks the password as Authenticator does."""

    times: int
    reply: str = "454 4.7.0 Temporary authentication failure"
    calls: int = 0

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        self.calls += 1
        if self.calls <= self.times:
            return AuthResult(success=False, handled=False, message=self.reply)
        return Authenticator()(server, session, envelope, mechanism, auth_data)


def test_a_temporary_auth_failure_is_retried_and_then_delivers(smtp_server: StartServer, pki: Pki) -> None:
    # smtplib tries each mechanism the relay offers before giving up: fail them all, once.
    failing = FailingFirst(times=2)
    handler, port = auth_server(smtp_server, pki, "starttls", authenticator=failing)
    sender = SmtpEmailSender(
        settings(port, security="starttls", ca_file=str(pki.ca_file), username=USERNAME, password=PASSWORD)
    )

    with pytest.raises(TransientDeliveryError, match=r"authentication failed \(temporary\): 454") as caught:
        sender.send_email(MESSAGE)
    assert PASSWORD not in caught.value.reason
    assert handler.received == []
    # The retry (the worker's next attempt) logs in afresh and delivers.
    assert_delivered(handler, sender.send_email(MESSAGE))
    sender.close()  # QUIT before the relay stops: it would otherwise leave its end open


def test_auth_not_offered_is_permanent(smtp_server: StartServer, pki: Pki) -> None:
    handler, port = smtp_server()  # plain server: no AUTH extension
    sender = SmtpEmailSender(settings(port, username=USERNAME, password=PASSWORD))

    with pytest.raises(PermanentDeliveryError, match="AUTH"):
        sender.send_email(MESSAGE)
    assert handler.received == []


@pytest.mark.parametrize(
    ("handler", "error", "reason"),
    [
        (
            Handler(data_reply="451 4.3.0 Try again later"),
            TransientDeliveryError,
            "451 4.3.0 Try again later",
        ),
        (
            Handler(rcpt_reply="451 4.3.0 Try again later"),
            TransientDeliveryError,
            "451 4.3.0 Try again later",
        ),
        (Handler(rcpt_reply="550 5.1.1 No such user"), PermanentDeliveryError, "550 5.1.1 No such user"),
        (
            Handler(data_reply="554 5.7.1 Rejected as spam"),
            PermanentDeliveryError,
            "554 5.7.1 Rejected as spam",
        ),
    ],
    ids=["data-451", "rcpt-451", "rcpt-550", "data-554"],
)
def test_smtp_replies_map_to_retry_or_give_up(
    smtp_server: StartServer, handler: Handler, error: type[DeliveryError], reason: str
) -> None:
    _, port = smtp_server(handler)

    with pytest.raises(error) as caught:
        SmtpEmailSender(settings(port)).send_email(MESSAGE)

    assert caught.value.reason == f"SMTP {reason}"
    assert CODE not in caught.value.reason


def test_closed_port_is_transient() -> None:
    port = free_port()  # bound and released: nothing listens there now

    with pytest.raises(TransientDeliveryError, match="connection failed"):
        SmtpEmailSender(settings(port)).send_email(MESSAGE)


def test_header_injection_through_the_recipient_is_refused(smtp_server: StartServer) -> None:
    handler, port = smtp_server()
    bad = EmailMessage(to="ada@example.com\r\nBcc: eve@example.com", subject="s", text="t", html="h")

    with pytest.raises(PermanentDeliveryError, match="invalid email header"):
        SmtpEmailSender(settings(port)).send_email(bad)
    assert handler.received == []


def test_one_connection_carries_many_messages(smtp_server: StartServer) -> None:
    handler, port = smtp_server()
    sender = SmtpEmailSender(settings(port))

    for _ in range(5):
        sender.send_email(MESSAGE)

    assert len(handler.received) == 5
    assert handler.connections == 1 and sender.connections_opened == 1


def test_a_refused_recipient_leaves_the_connection_usable(smtp_server: StartServer) -> None:
    handler, port = smtp_server(Handler(rcpt_reply="550 5.1.1 No such user"))
    sender = SmtpEmailSender(settings(port))
    with pytest.raises(PermanentDeliveryError):
        sender.send_email(MESSAGE)

    handler.rcpt_reply = None
    sender.send_email(MESSAGE)

    assert len(handler.received) == 1 and handler.connections == 1


def test_a_session_the_relay_dropped_is_replaced_for_the_same_message() -> None:
    port = free_port()
    first, second = Handler(), Handler()
    relay = CountingController(first, hostname="127.0.0.1", port=port, server_hostname="mx.test")
    relay.start()
    first.connections = 0  # start() connected once itself, to see the server answer
    sender = SmtpEmailSender(settings(port))
    sender.send_email(MESSAGE)
    # The relay restarts: the kept session is dead, which the sender learns only on the next send.
    relay.stop()
    relay = CountingController(second, hostname="127.0.0.1", port=port, server_hostname="mx.test")
    relay.start()
    second.connections = 0
    try:
        message_id = sender.send_email(MESSAGE)
    finally:
        relay.stop()

    assert_delivered(second, message_id)
    assert len(first.received) == 1 and second.connections == 1 and sender.connections_opened == 2


@pytest.mark.parametrize("command", ["mail", "rcpt", "data"])
def test_a_session_that_answers_421_is_replaced_for_the_same_message(
    smtp_server: StartServer, command: str
) -> None:
    handler, port = smtp_server()
    sender = SmtpEmailSender(settings(port))
    sender.send_email(MESSAGE)
    handler.received.clear()
    # 421 to any command of the kept session: the relay is closing it (RFC 5321 §3.8), not
    # refusing the message; smtplib reports it as a refused sender, recipient or data.
    setattr(handler, f"{command}_reply_once", "421 4.3.2 Service shutting down")

    message_id = sender.send_email(MESSAGE)

    assert_delivered(handler, message_id)
    assert handler.connections == 2


def test_threads_never_share_a_connection(smtp_server: StartServer) -> None:
    handler, port = smtp_server()
    sender = SmtpEmailSender(settings(port))
    threads, per_thread = 4, 10
    barrier = threading.Barrier(threads)
    failures: list[BaseException] = []

    def send_some() -> None:
        barrier.wait(timeout=30)
        try:
            for _ in range(per_thread):
                sender.send_email(MESSAGE)
        except BaseException as error:  # reported below; a thread's exception is otherwise lost
            failures.append(error)

    workers = [threading.Thread(target=send_some) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)

    assert failures == [] and not any(worker.is_alive() for worker in workers)
    assert len(handler.received) == threads * per_thread
    # One session per thread at most: interleaved commands on a shared one would have failed above.
    assert handler.connections <= threads


@pytest.mark.parametrize(
    ("configured", "issuer", "shown"),
    [
        ("security@acme.test", "Acme Corp", "Acme Corp <security@acme.test>"),
        ("Acme Security <security@acme.test>", "Acme Corp", "Acme Security <security@acme.test>"),
        ("Sécurité Acme <security@acme.test>", "Acme Corp", "Sécurité Acme <security@acme.test>"),
        ("security@acme.test", "", "security@acme.test"),
    ],
)
def test_the_sender_is_named_after_the_issuer_unless_the_address_names_someone(
    smtp_server: StartServer, configured: str, issuer: str, shown: str
) -> None:
    handler, port = smtp_server()
    message = dataclasses.replace(MESSAGE, sender_name=issuer)
    # Through the setting, as an operator writes it (TWOFACTOR_SMTP_FROM).
    from_address = Settings.from_env({"TWOFACTOR_SMTP_FROM": configured}).smtp.from_address
    SmtpEmailSender(settings(port, from_address=from_address)).send_email(message)
    [(envelope, received)] = handler.received
    assert received["From"] == shown
    assert envelope.mail_from == "security@acme.test"
