"""Email and SMS senders: one interface, several implementations, configuration picks."""

from twofactor_server.delivery.providers.base import (
    DeliveryError,
    EmailMessage,
    EmailSender,
    PermanentDeliveryError,
    ProviderConfigError,
    SmsMessage,
    SmsSender,
    TransientDeliveryError,
)
from twofactor_server.delivery.providers.console import ConsoleEmailSender, ConsoleSmsSender
from twofactor_server.delivery.providers.loading import (
    build_email_sender,
    build_sms_sender,
    load_custom_sms_sender,
)
from twofactor_server.delivery.providers.smtp import SmtpEmailSender
from twofactor_server.delivery.providers.sns import SnsSmsSender

__all__ = [
    "ConsoleEmailSender",
    "ConsoleSmsSender",
    "DeliveryError",
    "EmailMessage",
    "EmailSender",
    "PermanentDeliveryError",
    "ProviderConfigError",
    "SmsMessage",
    "SmsSender",
    "SmtpEmailSender",
    "SnsSmsSender",
    "TransientDeliveryError",
    "build_email_sender",
    "build_sms_sender",
    "load_custom_sms_sender",
]
