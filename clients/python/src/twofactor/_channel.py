"""What the sync and async clients share: channel settings (TLS, retries, metadata), requests."""

from __future__ import annotations

import datetime
import json
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from twofactor.v1 import admin_service_pb2

DEFAULT_TIMEOUT = 5.0
"""Seconds a call may take when the caller passes no timeout."""

# Calls that change nothing, or whose repetition leaves the same state, so gRPC's retry
# after UNAVAILABLE with no server answer cannot do harm (see NOT_REPEATED_AFTER_AN_ANSWER
# for those the SDK does not repeat once the server answered). Verify, ConfirmEnrollment,
# StartEnrollment, RegenerateBackupCodes and SendCode are left out: repeating
# them consumes a code, replaces a secret or sends another message.
# (SendCode callers pass an idempotency_key and retry themselves.) SetContact
# too: one call can change an address at once and fail to send the code that
# confirms another, and its step-up token is then spent.
RETRIED_METHODS: dict[str, tuple[str, ...]] = {
    "twofactor.v1.TwoFactorService": (
        "GetStatus",
        "GetChallenge",
        "GetBackupCodes",
        "DisableMethod",
    ),
    "twofactor.v1.AdminService": (
        "GetUser",
        "ListUsers",
        "GetPolicy",
        "ListAuditEvents",
        "ResetUser",
        "UnlockUser",
    ),
}


# Writes the server may answer UNAVAILABLE after it committed them (the storage deadline cut in
# just after COMMIT), so the SDK does not repeat them after a server's answer: a repeated
# DisableMethod fails on its spent step-up token; ResetUser, UnlockUser and GetBackupCodes each
# write another audit event, and ResetUser and GetBackupCodes email the user again. gRPC still
# retries them when no server answered (no headers: nothing reached the service).
NOT_REPEATED_AFTER_AN_ANSWER = frozenset({"DisableMethod", "GetBackupCodes", "ResetUser", "UnlockUser"})
_SHORTEST_ATTEMPT_SECONDS = 0.1
MAX_REQUEST_ID = 128  # the server keeps no more of an x-request-id


@dataclass(frozen=True)
class RetryPolicy:
    """How gRPC retries the safe calls after UNAVAILABLE.

    Before retry n (1-based) gRPC waits a random time between 0 and
    min(initial_backoff * backoff_multiplier**(n-1), max_backoff) seconds.
    gRPC caps max_attempts at 5. Every attempt counts against the call's timeout.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError("max_attempts must be between 2 and 5 (gRPC's limit)")
        if self.initial_backoff < 0.001 or self.max_backoff < 0.001 or self.backoff_multiplier <= 0:
            # gRPC's service config refuses a backoff below a millisecond (and the whole channel with it).
            raise ValueError("backoffs must be at least 0.001 s, and the multiplier positive")


def service_config(retry: RetryPolicy | None) -> str:
    """The `grpc.service_config` JSON: a retryPolicy for RETRIED_METHODS, or none."""
    if retry is None:
        return json.dumps({})
    names = [
        {"service": service, "method": method}
        for service, methods in RETRIED_METHODS.items()
        for method in methods
    ]
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": names,
                    "retryPolicy": {
                        "maxAttempts": retry.max_attempts,
                        "initialBackoff": f"{retry.initial_backoff:.3f}s",  # never 1e-05s
                        "maxBackoff": f"{retry.max_backoff:.3f}s",
                        "backoffMultiplier": retry.backoff_multiplier,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the channel. Pass none to the client for plaintext (local development only).

    root_ca: PEM of the CA that signed the server certificate; None trusts the public
    roots grpcio ships with (not the operating system's store: a private CA added there is
    not trusted; the GRPC_DEFAULT_SSL_ROOTS_FILE_PATH environment variable names another
    bundle). client_cert and client_key: PEM of the client certificate
    chain and its key, both or neither, for servers that require mTLS.
    server_name: the name to check the server certificate against, when it is
    not the host part of the target.
    """

    root_ca: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = field(default=None, repr=False)  # an error tracker records reprs of locals
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together (mTLS)")

    @classmethod
    def from_files(
        cls,
        root_ca: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        server_name: str | None = None,
    ) -> TlsConfig:
        """Read the PEM files named by path."""

        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls(read(root_ca), read(client_cert), read(client_key), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_ca,
            private_key=self.client_key,
            certificate_chain=self.client_cert,
        )


@dataclass(frozen=True)
class ChannelSettings:
    """Everything a client needs to open its channel and decorate its calls."""

    target: str
    token: str = field(repr=False)  # an error tracker records reprs of locals
    tls: TlsConfig | None
    timeout: float
    retry: RetryPolicy | None
    options: Sequence[tuple[str, Any]]

    def __post_init__(self) -> None:
        if not self.token or not _visible_ascii(self.token):
            raise ValueError("token must be a non-empty string of visible ASCII characters (no spaces)")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")

    def channel_options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", service_config(self.retry)),
            # Our service config wins over any a DNS TXT record might publish.
            ("grpc.service_config_disable_resolution", 1),
        ]
        if self.tls is not None and self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        options.extend(self.options)
        return options

    def metadata(self, request_id: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"), ("x-request-id", request_id))

    def deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def retry_wait(
        self, service: str, request: Any, error: Any, attempt: int, time_left: float
    ) -> float | None:
        """Seconds to wait before this client repeats a call itself, or None (the error stands).

        gRPC retries a safe call after UNAVAILABLE only until the server has sent response
        headers; the server sends them (x-request-id) before it answers, so its own
        UNAVAILABLE (STORAGE_UNAVAILABLE, BROKER_UNAVAILABLE) reaches here unretried. Such a
        call, with headers, is repeated here, under the same policy and within the call's
        deadline, unless it is a write the server may have committed before it answered
        (NOT_REPEATED_AFTER_AN_ANSWER); one without (no connection) was gRPC's to retry, and was.
        """
        retry = self.retry
        method = type(request).__name__.removesuffix("Request")
        if (
            retry is None
            or attempt >= retry.max_attempts
            or error.code() != grpc.StatusCode.UNAVAILABLE
            or method not in RETRIED_METHODS.get(service, ())
            or method in NOT_REPEATED_AFTER_AN_ANSWER
            or not error.initial_metadata()
        ):
            return None
        cap = min(retry.initial_backoff * retry.backoff_multiplier ** (attempt - 1), retry.max_backoff)
        wait = random.uniform(0, cap)  # noqa: S311 - jitter, as gRPC's own backoff
        # An attempt with next to no time left would turn the server's answer into DEADLINE_EXCEEDED.
        return wait if wait + _SHORTEST_ATTEMPT_SECONDS < time_left else None


def request_id_to_send(request_id: str | None) -> str:
    """The caller's request id, or a new UUID; ValueError for one gRPC metadata can't carry or
    the server would cut (it keeps 1 to 128 visible ASCII characters)."""
    if request_id is None or request_id == "":
        return str(uuid.uuid4())
    if len(request_id) > MAX_REQUEST_ID or not _visible_ascii(request_id):
        raise ValueError(f"request_id must be 1 to {MAX_REQUEST_ID} visible ASCII characters (no spaces)")
    return request_id


def _visible_ascii(text: str) -> bool:
    """Only "!" to "~": what a metadata value carries as is, and what the server keeps."""
    return all("!" <= c <= "~" for c in text)


def audit_events_request(
    *,
    user_id: str,
    actions: Sequence[str],
    since: datetime.datetime | None,
    until: datetime.datetime | None,
    page_size: int,
    page_token: str,
) -> admin_service_pb2.ListAuditEventsRequest:
    """ListAuditEvents' request; a naive datetime is read as UTC (protobuf's rule)."""
    request = admin_service_pb2.ListAuditEventsRequest(
        user_id=user_id, actions=list(actions), page_size=page_size, page_token=page_token
    )
    if since is not None:
        request.since.FromDatetime(since)
    if until is not None:
        request.until.FromDatetime(until)
    return request
