"""The delivery broker's health, reported apart from the server's: the health service name
`twofactor.v1.Delivery` and the twofactor_broker_up gauge.

Authenticator and backup-code logins need no broker, so an unreachable Redis never
takes "" or twofactor.v1.TwoFactorService down: only this name, and SendCode's
BROKER_UNAVAILABLE answers.
"""

from __future__ import annotations

import logging
from typing import Protocol

import redis
from grpc_health.v1 import health_pb2

from twofactor_server.observability import logs, metrics
from twofactor_server.setting_values import mask_url
from twofactor_server.settings import Settings

log = logging.getLogger(__name__)


class HealthStatuses(Protocol):
    """What this needs of the health service (twofactor_server.health.HealthServicer)."""

    def set(self, service: str, status: int) -> None: ...


DELIVERY_SERVICE = "twofactor.v1.Delivery"
CHECK_INTERVAL_SECONDS = 5.0
PROBE_KEY = "twofactor.broker-probe"  # written by each check, expiring: no code, no user


class BrokerHealth:
    """Pings the broker, writes a key that expires, and sets twofactor.v1.Delivery; SERVING for
    in-process delivery (no broker)."""

    def __init__(self, settings: Settings, servicer: HealthStatuses) -> None:
        self._url = settings.broker_url
        self._timeout = settings.broker_timeout_seconds
        self._servicer = servicer
        self._up: bool | None = None

    def check(self) -> bool:
        up = True
        if self._url:
            client = redis.Redis.from_url(
                self._url, socket_timeout=self._timeout, socket_connect_timeout=self._timeout
            )
            try:
                client.ping()
                # PING answers while writes are refused (out of memory, too few replicas, a failed
                # snapshot, a read-only replica after a failover), and so is every publish.
                client.set(PROBE_KEY, b"", px=60_000)
            except redis.exceptions.NoPermissionError:
                pass  # an ACL that leaves the probe key out may still let the queue's keys be written
            except redis.ResponseError as error:
                up = False
                if self._up is not False:
                    log.warning(
                        "the delivery broker at %s refuses writes (%s): SendCode and StartEnrollment "
                        "by email or SMS answer UNAVAILABLE (BROKER_UNAVAILABLE) until it takes them, "
                        "authenticator and backup-code logins go on; check Redis's memory, disk and "
                        "replicas, and that TWOFACTOR_BROKER_URL points at the primary",
                        mask_url(self._url),
                        logs.said(error),
                    )
            except (redis.RedisError, OSError) as error:
                up = False
                if self._up is not False:
                    log.warning(
                        "the delivery broker at %s does not answer (%s: %s): SendCode and "
                        "StartEnrollment by email or SMS answer UNAVAILABLE (BROKER_UNAVAILABLE) "
                        "until it does, authenticator and backup-code logins go on; check that "
                        "Redis is running and TWOFACTOR_BROKER_URL points at it",
                        mask_url(self._url),
                        type(error).__name__,
                        str(error).splitlines()[0] if str(error) else "no detail",
                    )
            finally:
                client.close()
        if up and self._up is False:
            log.warning("the delivery broker at %s answers again", mask_url(self._url))
        self._up = up
        metrics.broker_reachable(up)
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        self._servicer.set(DELIVERY_SERVICE, status)
        return up
