"""Build the configured email and SMS senders from Settings: the one place config picks a class."""

from __future__ import annotations

import importlib
from typing import Any, cast

from twofactor_server.delivery.providers.base import EmailSender, ProviderConfigError, SmsSender
from twofactor_server.delivery.providers.console import ConsoleEmailSender, ConsoleSmsSender
from twofactor_server.delivery.providers.smtp import SmtpEmailSender
from twofactor_server.delivery.providers.sns import SnsSmsSender
from twofactor_server.settings import Settings


def refuse_console_in_production(settings: Settings, variable: str) -> None:
    """Console providers print codes; with PostgreSQL (production) they need an explicit opt-in."""
    if not settings.embedded and not settings.allow_console_delivery:
        raise ProviderConfigError(
            f"{variable}=console prints codes to standard output, refused with TWOFACTOR_DATABASE_URL set; "
            "configure a real provider, or set TWOFACTOR_ALLOW_CONSOLE_DELIVERY=true for a test setup"
        )


def build_email_sender(settings: Settings) -> EmailSender:
    if settings.email_provider == "console":
        refuse_console_in_production(settings, "TWOFACTOR_EMAIL_PROVIDER")
        return ConsoleEmailSender()
    if settings.email_provider == "smtp":
        return SmtpEmailSender(settings.smtp)
    raise ProviderConfigError(f"email provider must be console or smtp, got {settings.email_provider!r}")


def build_sms_sender(settings: Settings) -> SmsSender:
    """console, sns, or a custom class named "package.module:ClassName" built with no arguments."""
    if settings.sms_provider == "console":
        refuse_console_in_production(settings, "TWOFACTOR_SMS_PROVIDER")
        return ConsoleSmsSender()
    if settings.sms_provider == "sns":
        return SnsSmsSender(settings.sns)
    return load_custom_sms_sender(settings.sms_provider)


def load_custom_sms_sender(path: str) -> SmsSender:
    """Import and instantiate `path`; every failure is a ProviderConfigError naming path and cause."""
    module_name, attribute = _split_path(path)
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # a broken module can raise anything at import time
        raise ProviderConfigError(
            f"TWOFACTOR_SMS_PROVIDER {path!r}: cannot import module {module_name!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    for name in attribute.split("."):  # "module:Outer.Inner" reaches nested classes too
        try:
            target = getattr(target, name)
        except AttributeError:
            raise ProviderConfigError(
                f"TWOFACTOR_SMS_PROVIDER {path!r}: no {attribute!r} in {module_name!r}"
            ) from None
    if not callable(target):
        raise ProviderConfigError(f"TWOFACTOR_SMS_PROVIDER {path!r}: {attribute!r} is not a class")
    try:
        sender = target()
    except Exception as exc:
        raise ProviderConfigError(
            f"TWOFACTOR_SMS_PROVIDER {path!r}: {attribute}() failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(getattr(sender, "send_sms", None)):
        raise ProviderConfigError(
            f"TWOFACTOR_SMS_PROVIDER {path!r}: {attribute} has no callable send_sms(message)"
        )
    return cast(SmsSender, sender)


def _split_path(path: str) -> tuple[str, str]:
    """Split "pkg.mod:Class" or "pkg.mod.Class" into ("pkg.mod", "Class")."""
    if ":" in path:
        module_name, _, attribute = path.partition(":")
    else:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute or ":" in attribute:
        raise ProviderConfigError(
            f"TWOFACTOR_SMS_PROVIDER must be console, sns or package.module:ClassName, got {path!r}"
        )
    return module_name, attribute
