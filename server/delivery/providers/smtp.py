"""Email delivery through an SMTP relay, one connection per message.

A connection per message keeps the sender stateless and safe to share between
worker threads; OTP mail is low-volume, so connection reuse buys little.
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage as MimeMessage
from email.utils import formatdate, make_msgid, parseaddr

from twofactor_server.delivery.providers.base import (
    DeliveryError,
    EmailMessage,
    PermanentDeliveryError,
    ProviderConfigError,
    TransientDeliveryError,
    shorten,
)
from twofactor_server.settings import SmtpSettings

SECURITY_MODES = ("starttls", "tls", "none")


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

    def send_email(self, message: EmailMessage) -> str:
        mime, message_id = self._build(message)
        try:
            self._deliver(mime)
        except (smtplib.SMTPException, OSError) as exc:
            raise _delivery_error(exc) from exc
        return message_id

    def _build(self, message: EmailMessage) -> tuple[MimeMessage, str]:
        if message.message_key:
            message_id = f"<{message.message_key}@{self._msgid_domain}>"
        else:
            message_id = make_msgid(domain=self._msgid_domain)
        mime = MimeMessage()
        try:
            mime["From"] = self._settings.from_address
            mime["To"] = message.to
            mime["Subject"] = message.subject
        except (ValueError, TypeError) as exc:
            # The email package refuses CR/LF in headers: no header injection through an address.
            raise PermanentDeliveryError(f"invalid email header: {exc}") from None
        mime["Date"] = formatdate(usegmt=True)
        mime["Message-ID"] = message_id
        mime.set_content(message.text)
        mime.add_alternative(message.html, subtype="html")
        return mime, message_id

    def _deliver(self, mime: MimeMessage) -> None:
        s = self._settings
        smtp: smtplib.SMTP
        if s.security == "tls":
            smtp = smtplib.SMTP_SSL(s.host, s.port, timeout=s.timeout_seconds, context=self._tls)
        else:
            smtp = smtplib.SMTP(s.host, s.port, timeout=s.timeout_seconds)
        try:
            if s.security == "starttls":
                # Never fall back to plain text: a relay without STARTTLS is an error.
                smtp.starttls(context=self._tls)
            if s.username:
                smtp.login(s.username, s.password)
            smtp.send_message(mime)
        finally:
            _quit_quietly(smtp)


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
        return PermanentDeliveryError(f"SMTP authentication failed: {_reply(exc.smtp_code, exc.smtp_error)}")
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
