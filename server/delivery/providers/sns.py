"""SMS delivery through Amazon SNS direct publish to a phone number.

Credentials come from boto3's usual chain (environment, profile, instance role);
settings only name the region, an optional endpoint (moto, VPC endpoint) and the
sender id.
"""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from twofactor_server.delivery.providers.base import (
    DeliveryError,
    PermanentDeliveryError,
    ProviderConfigError,
    SmsMessage,
    TransientDeliveryError,
    shorten,
)
from twofactor_server.settings import SnsSettings

# Codes AWS documents for throttling and server-side faults; a retry later can succeed.
TRANSIENT_ERROR_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "KMSThrottling",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
    }
)

# Fail fast and let the Celery task own retries, with its backoff and its view of
# the code's expiry; botocore's own retries would multiply with the task's.
_CLIENT_CONFIG = Config(
    connect_timeout=5,
    read_timeout=10,
    retries={"mode": "standard", "total_max_attempts": 1},
)


class SnsSmsSender:
    provider_name = "sns"  # the `provider` label of twofactor_deliveries_total

    def __init__(self, settings: SnsSettings, client: Any = None) -> None:
        if client is None:
            try:
                client = boto3.client(
                    "sns",
                    region_name=settings.region,
                    endpoint_url=settings.endpoint_url or None,
                    config=_CLIENT_CONFIG,
                )
            except (BotoCoreError, ValueError) as exc:
                raise ProviderConfigError(f"cannot create the SNS client: {exc}") from exc
        self._client = client
        self._attributes: dict[str, dict[str, str]] = {
            # Transactional: AWS favours reliable delivery over cost, which an OTP needs.
            "AWS.SNS.SMS.SMSType": {"DataType": "String", "StringValue": "Transactional"},
        }
        if settings.sender_id:
            self._attributes["AWS.SNS.SMS.SenderID"] = {
                "DataType": "String",
                "StringValue": settings.sender_id,
            }

    def send_sms(self, message: SmsMessage) -> str:
        try:
            response = self._client.publish(
                PhoneNumber=message.to,
                Message=message.text,
                MessageAttributes=self._attributes,
            )
        except (ClientError, BotoCoreError) as exc:
            raise _delivery_error(exc) from exc
        return str(response["MessageId"])


def _delivery_error(exc: ClientError | BotoCoreError) -> DeliveryError:
    """Map botocore failures to retry-or-give-up; reasons never include the message text."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        detail = error.get("Message")
        reason = shorten(f"SNS {code}: {detail}" if detail else f"SNS {code}")
        if code in TRANSIENT_ERROR_CODES or status == 429 or status >= 500:
            return TransientDeliveryError(reason)
        # InvalidParameter (bad number), OptedOut, AuthorizationError, ...: retrying cannot help.
        return PermanentDeliveryError(reason)
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError.
        return TransientDeliveryError(f"SNS connection failed: {shorten(str(exc))}")
    # NoCredentialsError, ParamValidationError and the like are configuration problems.
    return PermanentDeliveryError(f"SNS error: {shorten(str(exc))}")
