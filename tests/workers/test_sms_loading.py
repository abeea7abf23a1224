from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest

from tests.workers.custom_sms import RecordingSmsSender
from twofactor_server.delivery.providers import (
    ConsoleEmailSender,
    ConsoleSmsSender,
    EmailMessage,
    ProviderConfigError,
    SmsMessage,
    SmtpEmailSender,
    SnsSmsSender,
    build_email_sender,
    build_sms_sender,
)
from twofactor_server.settings import Settings, SmtpSettings


def sms_settings(provider: str) -> Settings:
    return Settings(sms_provider=provider)


@pytest.mark.parametrize(
    "path", ["tests.workers.custom_sms:RecordingSmsSender", "tests.workers.custom_sms.RecordingSmsSender"]
)
def test_custom_class_is_loaded_by_dotted_path_and_receives_messages(path: str) -> None:
    sender = build_sms_sender(sms_settings(path))

    assert isinstance(sender, RecordingSmsSender)
    message = SmsMessage(to="+14155550123", text="Your Acme verification code is 123456.")
    assert sender.send_sms(message) == "recorded-1"
    assert sender.sent == [message]


def test_nested_class_is_reachable_after_the_colon() -> None:
    sender = build_sms_sender(sms_settings("tests.workers.custom_sms:RecordingSmsSender.Nested"))
    assert sender.send_sms(SmsMessage(to="+14155550123", text="x")) == "nested"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("tests.workers.no_such_module:Sender", "cannot import module 'tests.workers.no_such_module'"),
        ("tests.workers.custom_sms:NoSuchClass", "no 'NoSuchClass' in 'tests.workers.custom_sms'"),
        ("tests.workers.custom_sms:NoSendMethod", "NoSendMethod has no callable send_sms"),
        ("tests.workers.custom_sms:SendSmsNotCallable", "SendSmsNotCallable has no callable send_sms"),
        ("tests.workers.custom_sms:BrokenConstructor", "RuntimeError: gateway token missing"),
        ("tests.workers.custom_sms:NOT_A_CLASS", "'NOT_A_CLASS' is not a class"),
        ("twilio", "must be console, sns or package.module:ClassName"),
        (":Sender", "must be console, sns or package.module:ClassName"),
        ("tests.workers.custom_sms:", "must be console, sns or package.module:ClassName"),
    ],
)
def test_unusable_custom_provider_is_a_config_error_naming_the_problem(path: str, expected: str) -> None:
    with pytest.raises(ProviderConfigError) as caught:
        build_sms_sender(sms_settings(path))

    assert expected in str(caught.value)
    assert repr(path) in str(caught.value) or "must be console" in str(caught.value)


def test_builtin_sms_providers_build_their_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    # Dummy credentials keep boto3 from probing this machine's profile or instance metadata.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert isinstance(build_sms_sender(sms_settings("console")), ConsoleSmsSender)
    assert isinstance(build_sms_sender(sms_settings("sns")), SnsSmsSender)


def test_builtin_email_providers_build_their_classes() -> None:
    assert isinstance(build_email_sender(Settings(email_provider="console")), ConsoleEmailSender)
    assert isinstance(build_email_sender(Settings(email_provider="smtp")), SmtpEmailSender)
    with pytest.raises(ProviderConfigError, match="console or smtp"):
        build_email_sender(Settings(email_provider="ses"))


def test_smtp_configuration_errors_stop_startup(tmp_path: Path) -> None:
    bad_mode = dataclasses.replace(Settings(email_provider="smtp"), smtp=SmtpSettings(security="ssl"))
    with pytest.raises(ProviderConfigError, match="security"):
        build_email_sender(bad_mode)

    missing_ca = SmtpSettings(ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ProviderConfigError, match="CA file"):
        build_email_sender(Settings(email_provider="smtp", smtp=missing_ca))


def test_console_senders_write_a_development_banner_and_return_ids() -> None:
    stream = io.StringIO()
    sms_id = ConsoleSmsSender(stream).send_sms(SmsMessage(to="+14155550123", text="code 123456"))
    email_id = ConsoleEmailSender(stream).send_email(
        EmailMessage(to="ada@example.com", subject="Your code", text="code 654321", html="<p>654321</p>")
    )

    output = stream.getvalue()
    assert output.count("development-only delivery") == 2
    assert "+14155550123" in output and "code 123456" in output
    assert "ada@example.com" in output and "code 654321" in output
    assert sms_id.startswith("console-") and email_id.startswith("console-") and sms_id != email_id
    assert sms_id in output and email_id in output
