"""Email delivery through an SMTP relay, over a connection kept open and reused.

Each thread of each process keeps its own connection (a Celery pool process has
one thread; the embedded dispatcher's thread pool one per thread), so no
connection is ever shared. A connection idle for longer than IDLE_SECONDS, or
that carried MESSAGES_PER_CONNECTION messages, is closed and a new one opened;
a reused connection that turns out dead (the relay closed it, or answered 421)
is replaced once, at once, for the same message. Opening a connection per
message cost a TCP (and TLS) handshake, EHLO and AUTH for every email: at
fleet speed the handshakes, not the messages, were the work (bench/suite.py).
"""

from __future__ import annotations

import os
import smtplib
import ssl
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage as MimeMessage
from email.utils import formataddr, formatdate, make_msgid, parseaddr

from twofactor_server.delivery.providers.base import (
    DeliveryError,
    EmailMessage,
    PermanentDeliveryError,
    ProviderConfigError,
    TransientDeliveryError,
    shorten,
)
from twofactor_server.delivery.providers.mime import bare_address, message_bytes, plain_address
from twofactor_server.settings import SmtpSettings

SECURITY_MODES = ("starttls", "tls", "none")
# Relays close idle sessions (RFC 5321 §4.5.3.2.7 suggests 5 minutes); well before that we stop trusting one.
IDLE_SECONDS = 30.0
# Some relays cap the messages of one session; a modest cap also spreads load over a relay pool.
MESSAGES_PER_CONNECTION = 100
# Replies that mean "this session is over, try again on a new one".
_SESSION_OVER = (421,)


@dataclass(frozen=True)
class Outgoing:
    """A message ready for DATA: its bytes and envelope, or (the rare shapes) an email-package message."""

    raw: bytes = b""
    mail_from: str = ""
    to: str = ""
    mime: MimeMessage | None = None


class _Session(smtplib.SMTP):
    """smtplib's MAIL FROM and RCPT TO, with a bare address quoted without parsing it again.

    smtplib's `quoteaddr` runs `email.utils.parseaddr` on both addresses of every message
    (8 % of a pool process's instructions per email, docs/benchmarks.md) only to
    write "<address>" for the dot-atom addresses `message_bytes` has already checked.
    """

    def mail(self, sender: str, options: Sequence[str] = ()) -> tuple[int, bytes]:
        if any(option.lower() == "smtputf8" for option in options):
            return super().mail(sender, options)  # smtplib switches the session's encoding
        self.putcmd("mail", f"from:{quoted(sender)}{self._options(options)}")
        return self.getreply()

    def rcpt(self, recip: str, options: Sequence[str] = ()) -> tuple[int, bytes]:
        self.putcmd("rcpt", f"to:{quoted(recip)}{self._options(options)}")
        return self.getreply()

    def _options(self, options: Sequence[str]) -> str:
        return " " + " ".join(options) if options and self.does_esmtp else ""


class _TlsSession(_Session, smtplib.SMTP_SSL):
    pass


def quoted(address: str) -> str:
    """What smtplib.quoteaddr returns, without parsing a bare address."""
    return f"<{address}>" if bare_address(address) else smtplib.quoteaddr(address)


class _Connection:
    """An open SMTP session, with who opened it and how much it has carried."""

    def __init__(self, smtp: smtplib.SMTP) -> None:
        self.smtp = smtp
        self.pid = os.getpid()
        self.messages = 0
        self.last_used = time.monotonic()


class SmtpEmailSender:
    provider_name = "smtp"  # the `provider` label of twofactor_deliveries_total

    def __init__(self, settings: SmtpSettings) -> None:
        if settings.security not in SECURITY_MODES:
            raise ProviderConfigError(
                f"SMTP security must be one of {', '.join(SECURITY_MODES)}, got {settings.security!r}"
            )
        self._settings = settings
        # Built once, so a missing or unreadable CA file stops startup rather than every send.
        self._tls: ssl.SSLContext | None = None
        if settings.security != "none":
            try:
                self._tls = ssl.create_default_context()
                if settings.ca_file:
                    # In addition to the system store, as settings document ca_file as "extra".
                    self._tls.load_verify_locations(cafile=settings.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ProviderConfigError(f"SMTP CA file {settings.ca_file!r} is unusable: {exc}") from exc
        # make_msgid would otherwise call socket.getfqdn(), a DNS lookup per message.
        self._msgid_domain = parseaddr(settings.from_address)[1].rpartition("@")[2] or "localhost"
        self._from_headers: dict[str, str] = {}
        self._local = threading.local()  # .connection: this thread's open session, if any
        self.connections_opened = 0  # in this process, for the bench and tests
        # Every session this sender holds open, so that they are closed when the sender goes.
        self._open_sessions: set[smtplib.SMTP] = set()
        self._sessions_lock = threading.Lock()
        weakref.finalize(self, _close_all, self._open_sessions, self._sessions_lock)

    def close(self) -> None:
        """Say goodbye on this thread's connection, if one is open (a worker shutting down)."""
        connection = self._take()
        if connection is not None:
            self._quit(connection.smtp)

    def send_email(self, message: EmailMessage) -> str:
        outgoing, message_id = self._build(message)
        try:
            self._deliver(outgoing)
        except (smtplib.SMTPException, OSError) as exc:
            raise _delivery_error(exc) from exc
        return message_id

    def _build(self, message: EmailMessage) -> tuple[Outgoing, str]:
        if message.message_key:
            message_id = f"<{message.message_key}@{self._msgid_domain}>"
        else:
            message_id = make_msgid(domain=self._msgid_domain)
        from_header = self._from_header(message.sender_name)
        raw = message_bytes(
            from_header=from_header,
            to=message.to,
            subject=message.subject,
            message_id=message_id,
            text=message.text,
            html=message.html,
        )
        mail_from = plain_address(from_header)
        if raw is not None and mail_from is not None:  # the usual case: the same bytes, 10x cheaper
            return Outgoing(raw=raw, mail_from=mail_from, to=message.to), message_id
        mime = MimeMessage()
        try:
            mime["From"] = from_header
            mime["To"] = message.to
            mime["Subject"] = message.subject
        except (ValueError, TypeError) as exc:
            # The email package refuses CR/LF in headers: no header injection through an address.
            raise PermanentDeliveryError(f"invalid email header: {exc}") from None
        mime["Date"] = formatdate(usegmt=True)
        mime["Message-ID"] = message_id
        mime.set_content(message.text)
        mime.add_alternative(message.html, subtype="html")
        return Outgoing(mime=mime), message_id

    def _from_header(self, name: str) -> str:
        """sender(), kept per issuer name: there is one issuer, and parsing the address costs."""
        header = self._from_headers.get(name)
        if header is None:
            header = sender(self._settings.from_address, name)
            if len(self._from_headers) < 64:
                self._from_headers[name] = header
        return header

    def _deliver(self, outgoing: Outgoing) -> None:
        connection = self._reusable()
        if connection is not None:
            try:
                self._send_on(connection, outgoing)
                return
            except (smtplib.SMTPServerDisconnected, ConnectionError) as exc:
                del exc  # the relay dropped the idle session: a new one below, for the same message
            except smtplib.SMTPResponseException as exc:
                if exc.smtp_code not in _SESSION_OVER:
                    raise
            except smtplib.SMTPRecipientsRefused as exc:  # how smtplib reports a 421 to RCPT
                if not all(code in _SESSION_OVER for code, _ in exc.recipients.values()):
                    raise
        self._send_on(self._open(), outgoing)

    def _send_on(self, connection: _Connection, outgoing: Outgoing) -> None:
        """Send on `connection`, and keep it for the next message unless this failed oddly.

        After a refused sender or recipient or a refused DATA, smtplib has reset the
        transaction (RSET) and the session stays usable, unless the reply was 421 (it
        then closed the socket); after anything else the session is closed.
        """
        try:
            if outgoing.mime is not None:
                connection.smtp.send_message(outgoing.mime)
            else:
                connection.smtp.sendmail(outgoing.mail_from, [outgoing.to], outgoing.raw)
        except (smtplib.SMTPRecipientsRefused, smtplib.SMTPSenderRefused, smtplib.SMTPDataError):
            if connection.smtp.sock is not None:
                self._keep(connection)
            raise
        except BaseException:
            self._quit(connection.smtp)
            raise
        self._keep(connection)

    def _keep(self, connection: _Connection) -> None:
        connection.messages += 1
        connection.last_used = time.monotonic()
        if connection.messages >= MESSAGES_PER_CONNECTION:
            self._quit(connection.smtp)
        else:
            self._local.connection = connection

    def _take(self) -> _Connection | None:
        connection: _Connection | None = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None and connection.pid != os.getpid():
            # Inherited through fork: the socket is the parent's session; close our copy, say nothing.
            with self._sessions_lock:
                self._open_sessions.discard(connection.smtp)
            connection.smtp.close()
            return None
        return connection

    def _reusable(self) -> _Connection | None:
        """This thread's open session if it is fresh enough to trust, else None (and it is closed)."""
        connection = self._take()
        if connection is not None and time.monotonic() - connection.last_used > IDLE_SECONDS:
            self._quit(connection.smtp)
            return None
        return connection

    def _open(self) -> _Connection:
        s = self._settings
        smtp: smtplib.SMTP
        if s.security == "tls":
            smtp = _TlsSession(s.host, s.port, timeout=s.timeout_seconds, context=self._tls)
        else:
            smtp = _Session(s.host, s.port, timeout=s.timeout_seconds)
        self.connections_opened += 1
        with self._sessions_lock:
            self._open_sessions.add(smtp)
        try:
            if s.security == "starttls":
                # Never fall back to plain text: a relay without STARTTLS is an error.
                smtp.starttls(context=self._tls)
            if s.username:
                smtp.login(s.username, s.password)
        except BaseException:
            self._quit(smtp)
            raise
        return _Connection(smtp)

    def _quit(self, smtp: smtplib.SMTP) -> None:
        with self._sessions_lock:
            self._open_sessions.discard(smtp)
        _quit_quietly(smtp)


def _close_all(sessions: set[smtplib.SMTP], lock: threading.Lock) -> None:
    """Close the sockets of a sender that is going away (no QUIT: this may run in a finalizer)."""
    with lock:
        for smtp in sessions:
            smtp.close()
        sessions.clear()


def _quit_quietly(smtp: smtplib.SMTP) -> None:
    """Say goodbye without letting QUIT decide the outcome.

    Unlike `with smtp:`, a failed QUIT neither hides the real error nor turns an
    accepted message into a retry (and so a duplicate email).
    """
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        pass
    finally:
        smtp.close()


def _delivery_error(exc: smtplib.SMTPException | OSError) -> DeliveryError:
    """Map smtplib/socket failures to retry-or-give-up; reasons carry codes, never the body."""
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        reply = _reply(exc.smtp_code, exc.smtp_error)
        if 400 <= exc.smtp_code < 500:
            # 454 (RFC 4954) or 421: the relay's own trouble, which passes; 535 and the like don't.
            return TransientDeliveryError(f"SMTP authentication failed (temporary): {reply}")
        return PermanentDeliveryError(f"SMTP authentication failed: {reply}")
    if isinstance(exc, smtplib.SMTPResponseException):
        return _by_code(exc.smtp_code, exc.smtp_error)
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        # Every recipient was refused; there is one per message, so take its reply.
        code, text = next(iter(exc.recipients.values()), (550, b"recipient refused"))
        return _by_code(code, text)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return TransientDeliveryError(f"SMTP server disconnected: {shorten(str(exc))}")
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return PermanentDeliveryError(f"SMTP server lacks a required extension: {shorten(str(exc))}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        # A certificate we do not trust will not become trusted by retrying: fix the CA file.
        detail = shorten(exc.verify_message or str(exc))
        return PermanentDeliveryError(f"SMTP server certificate rejected: {detail}")
    if isinstance(exc, OSError):  # connection refused/reset, timeouts, TLS handshake failures
        return TransientDeliveryError(f"SMTP connection failed: {type(exc).__name__}: {shorten(str(exc))}")
    # Any other SMTPException, e.g. no AUTH mechanism in common: a configuration problem.
    return PermanentDeliveryError(f"SMTP error: {shorten(str(exc))}")


def _by_code(code: int, text: bytes | str) -> DeliveryError:
    reply = _reply(code, text)
    if 400 <= code < 500:
        return TransientDeliveryError(f"SMTP {reply}")
    return PermanentDeliveryError(f"SMTP {reply}")


def _reply(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return shorten(f"{code} {text}")


def sender(from_address: str, name: str) -> str:
    """The From header: the configured address as it is when it names someone
    ("Acme Security <security@acme.example>"), else the issuer's name before the bare address."""
    display, address = parseaddr(from_address)
    if display or not name or not address:
        return from_address
    return formataddr((" ".join(name.split()), address))
