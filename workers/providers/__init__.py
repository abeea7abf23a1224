"""Email and SMS senders: one interface, several implementations, configuration picks."""

from workers.providers.base import (
    DeliveryError,
    EmailMessage,
    EmailSender,
    PermanentDeliveryError,
    ProviderConfigError,
    SmsMessage,
    SmsSender,
    TransientDeliveryError,
)
from workers.providers.console import ConsoleEmailSender, ConsoleSmsSender
from workers.providers.loading import build_email_sender, build_sms_sender, load_custom_sms_sender
from workers.providers.smtp import SmtpEmailSender
from workers.providers.sns import SnsSmsSender

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
