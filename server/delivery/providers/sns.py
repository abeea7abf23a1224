"""SMS delivery through Amazon SNS direct publish to a phone number.

Credentials come from boto3's usual chain (environment, profile, instance role);
settings only name the region, an optional endpoint (moto, VPC endpoint) and the
sender id. A client built while no credentials could be found (an instance or
container role endpoint that does not answer yet at start) would keep none for
its whole life: such an attempt is a transient error, and the next one builds a
new session and client, which look for credentials again.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    NoCredentialsError,
)
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

log = logging.getLogger(__name__)

# Codes AWS documents for throttling and server-side faults; a retry later can succeed.
# Temporary credentials past their expiry: renewed ones may be found at the next attempt.
EXPIRED_CREDENTIAL_CODES = frozenset({"ExpiredToken", "ExpiredTokenException"})
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
# Credentials the chain did not find, or a role endpoint that did not answer: it may answer later.
_CREDENTIAL_ERRORS = (NoCredentialsError, CredentialRetrievalError)


class SnsSmsSender:
    provider_name = "sns"  # the `provider` label of twofactor_deliveries_total

    def __init__(self, settings: SnsSettings, client: Any = None) -> None:
        self._settings = settings
        # Threads of the embedded dispatcher share one sender: the lock guards building and dropping
        # the client (boto3 sessions are not thread-safe; a client, once built, is).
        self._lock = threading.Lock()
        if client is None:
            try:
                client = self._new_client()
            except _CREDENTIAL_ERRORS as exc:
                # A container role endpoint that does not answer yet: start anyway, and look again
                # at the first text (any other error building the client still refuses to start).
                log.warning("%s", _credentials_reason(exc))
        self._client: Any = client
        if not settings.endpoint_url and settings.region not in _known_sns_regions():
            # Said, not refused: a region newer than this botocore works all the same.
            log.warning(
                "TWOFACTOR_SNS_REGION %s is no SNS region this botocore knows: if it is mistyped, "
                "every text fails; check it",
                settings.region,
            )
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
        client = None
        try:
            client = self._current_client()
            response = client.publish(
                PhoneNumber=message.to,
                Message=message.text,
                MessageAttributes=self._attributes,
            )
        except _CREDENTIAL_ERRORS as exc:
            self._drop_client(client)
            reason = _credentials_reason(exc)
            log.warning("%s", reason)
            raise TransientDeliveryError(reason) from exc
        except (ClientError, BotoCoreError) as exc:
            if isinstance(exc, ClientError) and _error_code(exc) in EXPIRED_CREDENTIAL_CODES:
                # Session credentials that expired (a shared file or variables that a sidecar
                # renews): the client keeps them, so a new client looks along the chain again.
                self._drop_client(client)
            raise _delivery_error(exc) from exc
        return str(response["MessageId"])

    def _new_client(self) -> Any:
        """A client of a new session: it looks for credentials along the whole chain again."""
        try:
            return boto3.session.Session().client(
                "sns",
                region_name=self._settings.region,
                endpoint_url=self._settings.endpoint_url or None,
                config=_CLIENT_CONFIG,
            )
        except _CREDENTIAL_ERRORS:
            raise
        except (BotoCoreError, ValueError) as exc:
            raise ProviderConfigError(f"cannot create the SNS client: {exc}") from exc

    def _current_client(self) -> Any:
        client = self._client  # the usual case: built, and kept while it finds credentials
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                self._client = self._new_client()
            return self._client

    def _drop_client(self, failed: Any) -> None:
        """Forget the client that found no credentials; the next attempt builds another. Only that
        one: another thread may already have replaced it with a client that has credentials."""
        with self._lock:
            if failed is not None and self._client is failed:
                self._client = None


def _known_sns_regions() -> set[str]:
    session = boto3.session.Session()
    return {
        region
        for partition in session.get_available_partitions()
        for region in session.get_available_regions("sns", partition_name=partition)
    }


def _credentials_reason(exc: BotoCoreError) -> str:
    """One line: what failed and what to do (no secrets: botocore's messages name no key)."""
    advice = "looked up again at the next attempt: give the worker AWS credentials or an IAM role"
    if isinstance(exc, CredentialRetrievalError):
        provider = exc.kwargs.get("provider", "the credential provider")
        detail = exc.kwargs.get("error_msg", "")
        return shorten(f"SNS: AWS credentials could not be retrieved from {provider}; {advice} ({detail})")
    return shorten(
        f"SNS: no AWS credentials found (environment, shared file, instance/container role); {advice}"
    )


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "Unknown"))


def _delivery_error(exc: ClientError | BotoCoreError) -> DeliveryError:
    """Map botocore failures to retry-or-give-up; reasons never include the message text."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = _error_code(exc)
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        detail = error.get("Message")
        reason = shorten(f"SNS {code}: {detail}" if detail else f"SNS {code}")
        if (
            code in TRANSIENT_ERROR_CODES
            or code in EXPIRED_CREDENTIAL_CODES
            or status == 429
            or status >= 500
        ):
            return TransientDeliveryError(reason)
        # InvalidParameter (bad number), OptedOut, AuthorizationError, ...: retrying cannot help.
        return PermanentDeliveryError(reason)
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError.
        return TransientDeliveryError(f"SNS connection failed: {shorten(str(exc))}")
    # ParamValidationError, PartialCredentialsError and the like are configuration problems.
    return PermanentDeliveryError(f"SNS error: {shorten(str(exc))}")
