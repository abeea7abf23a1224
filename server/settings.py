"""All configuration, read from TWOFACTOR_* environment variables.

This is the only module that reads the environment. Everything else receives a
Settings (or the parts of it it needs) as constructor arguments.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from twofactor_server.domain.keyring import MAX_VERSION, Keyring, KeyringError
from twofactor_server.setting_values import (
    LOG_LEVELS,
    METHOD_NAMES,
    EnvValues,
)
from twofactor_server.setting_values import (
    SettingsError as SettingsError,  # re-exported: callers catch it from here
)
from twofactor_server.setting_values import (
    TokenSetting as TokenSetting,
)

# Seconds a timeout may be. Every float setting has a range like an int one; nan and inf are in none.
TIMEOUT_RANGE = (0.05, 3600.0)


@dataclass(frozen=True)
class PolicySettings:
    allowed_methods: tuple[str, ...] = METHOD_NAMES
    force_two_factor: bool = False
    allow_admin_reset: bool = True
    issuer: str = "twofactor"
    backup_code_count: int = 10
    code_length: int = 6
    code_ttl_seconds: int = 600  # NIST SP 800-63B maximum for out-of-band codes
    max_attempts_per_code: int = 5
    resend_cooldown_seconds: int = 30
    sends_per_user_per_hour: int = 10
    sends_per_destination_per_hour: int = 10
    idempotency_window_seconds: int = 600
    lockout_threshold: int = 5
    lockout_base_seconds: int = 60
    lockout_max_seconds: int = 86400
    max_consecutive_failures: int = 100  # NIST SP 800-63B §5.2.2
    audit_verifications: str = "failures"  # failures | all (accepted codes too)
    # Sensitive calls for an enrolled user need a recent verification_token from Verify.
    step_up_required: bool = True
    step_up_seconds: int = 300
    # SMS pumping guard: ISO 3166 countries numbers may be in (empty: all), and texts per clock
    # hour per country and in all (0: no cap).
    sms_allowed_countries: tuple[str, ...] = ()
    sms_per_country_per_hour: int = 0
    sms_per_hour: int = 0
    # Email the user about every sensitive change to their second factor (usecases/notices.py).
    notify_users: bool = True


@dataclass(frozen=True)
class SmtpSettings:
    host: str = "localhost"
    port: int = 587
    security: str = "starttls"  # starttls | tls | none
    username: str = ""
    password: str = ""
    from_address: str = "twofactor@localhost"
    timeout_seconds: float = 10.0
    ca_file: str = ""  # extra CA bundle to trust (private relays, tests)


@dataclass(frozen=True)
class SnsSettings:
    region: str = "us-east-1"
    endpoint_url: str = ""  # empty = AWS; set for moto or a VPC endpoint
    sender_id: str = ""


@dataclass(frozen=True)
class Settings:
    listen: str = "127.0.0.1:50051"
    # Empty: the embedded default, a SQLite file under data_dir.
    database_url: str = ""
    database_pool_size: int = 10
    # Every unit of storage work answers within this, or the call is UNAVAILABLE (STORAGE_UNAVAILABLE).
    storage_timeout_seconds: float = 2.0
    storage_probe_seconds: float = 1.0  # how often health checks that the database answers
    data_dir: Path = Path(".twofactor")
    # "version:base64key" pairs (validated by from_env); every version decrypts.
    keys: str = ""
    # The version that encrypts and hashes new values; None: the highest in `keys`.
    active_key_version: int | None = None
    # Empty: the embedded default, delivery tasks run in-process.
    broker_url: str = ""
    broker_timeout_seconds: float = 2.0
    delivery_queue: str = "twofactor"
    delivery_retry_base_seconds: float = 2.0  # first retry after a transient failure; doubles, with jitter
    # A lost delivery (broker restarted, server or worker died) is published again within about this.
    outbox_recovery_seconds: float = 10.0
    # How long one worker holds a claimed delivery; longer than an attempt and any retry countdown.
    delivery_lease_seconds: float = 120.0
    email_provider: str = "console"  # console | smtp
    sms_provider: str = "console"  # console | sns | package.module:ClassName
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    sns: SnsSettings = field(default_factory=SnsSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    tokens: tuple[TokenSetting, ...] = ()
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""  # set: clients must present a certificate (mTLS)
    max_workers: int = 8  # a small pool: fewer threads contend for the GIL (docs/benchmarks.md)
    grace_seconds: float = 10.0
    log_level: str = "INFO"
    log_format: str = ""  # json | text; empty: text at a terminal, json otherwise
    metrics_listen: str = ""  # host:port of /metrics; empty: no metrics endpoint
    allow_console_delivery: bool = False  # console providers with PostgreSQL (they print codes)
    audit_retention_days: int = 365
    migrate_on_start: bool = True  # false: `twofactor migrate` (a job) applies migrations
    retention_interval_seconds: float = 3600.0  # how often the retention job runs (server and workers)

    @property
    def embedded(self) -> bool:
        return not self.database_url

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        return cls._read(EnvValues(os.environ if environ is None else environ))

    @classmethod
    def _read(cls, env: EnvValues) -> Settings:
        defaults = PolicySettings()
        policy = PolicySettings(
            allowed_methods=env.methods("ALLOWED_METHODS", defaults.allowed_methods),
            force_two_factor=env.bool("FORCE_2FA", defaults.force_two_factor),
            allow_admin_reset=env.bool("ALLOW_ADMIN_RESET", defaults.allow_admin_reset),
            issuer=env.matching(
                "ISSUER",
                defaults.issuer,
                "text",
                r"[^:]{1,100}",
                "1 to 100 characters without ':' (the authenticator app's label separates the issuer "
                "from the account with it, and the QR code holds the issuer twice)",
            ),
            backup_code_count=env.int("BACKUP_CODE_COUNT", defaults.backup_code_count, 1, 100),
            code_length=env.int("CODE_LENGTH", defaults.code_length, 6, 10),
            code_ttl_seconds=env.int("CODE_TTL_SECONDS", defaults.code_ttl_seconds, 30, 600),
            max_attempts_per_code=env.int("MAX_ATTEMPTS_PER_CODE", defaults.max_attempts_per_code, 1, 20),
            resend_cooldown_seconds=env.int(
                "RESEND_COOLDOWN_SECONDS", defaults.resend_cooldown_seconds, 0, 3600
            ),
            sends_per_user_per_hour=env.int(
                "SENDS_PER_USER_PER_HOUR", defaults.sends_per_user_per_hour, 1, 1000
            ),
            sends_per_destination_per_hour=env.int(
                "SENDS_PER_DESTINATION_PER_HOUR", defaults.sends_per_destination_per_hour, 1, 1000
            ),
            lockout_threshold=env.int("LOCKOUT_THRESHOLD", defaults.lockout_threshold, 1, 100),
            lockout_base_seconds=env.int("LOCKOUT_BASE_SECONDS", defaults.lockout_base_seconds, 1, 86400),
            lockout_max_seconds=env.int("LOCKOUT_MAX_SECONDS", defaults.lockout_max_seconds, 1, 10**7),
            max_consecutive_failures=env.int(
                "MAX_CONSECUTIVE_FAILURES", defaults.max_consecutive_failures, 1, 100
            ),
            audit_verifications=env.choice(
                "AUDIT_VERIFICATIONS", defaults.audit_verifications, ("failures", "all")
            ),
            step_up_required=env.choice("STEP_UP", "required", ("required", "off")) == "required",
            step_up_seconds=env.int("STEP_UP_SECONDS", defaults.step_up_seconds, 10, 86400),
            sms_allowed_countries=env.countries("SMS_ALLOWED_COUNTRIES"),
            sms_per_country_per_hour=env.int("SMS_PER_COUNTRY_PER_HOUR", 0, 0, 10**7),
            sms_per_hour=env.int("SMS_PER_HOUR", 0, 0, 10**7),
            notify_users=env.bool("NOTIFY_USERS", defaults.notify_users),
        )
        active_key_version = env.optional_int("ACTIVE_KEY_VERSION", 1, MAX_VERSION)
        keys = env.text("KEYS", "")
        if keys:
            check_keys(keys, active_key_version)
        if policy.lockout_threshold > policy.max_consecutive_failures:
            raise SettingsError("TWOFACTOR_LOCKOUT_THRESHOLD exceeds TWOFACTOR_MAX_CONSECUTIVE_FAILURES")
        smtp = SmtpSettings(
            host=env.text("SMTP_HOST", SmtpSettings.host),
            port=env.int("SMTP_PORT", SmtpSettings.port, 1, 65535),
            security=env.choice("SMTP_SECURITY", SmtpSettings.security, ("starttls", "tls", "none")),
            username=env.text("SMTP_USERNAME", ""),
            password=env.text("SMTP_PASSWORD", ""),
            from_address=env.sender("SMTP_FROM", SmtpSettings.from_address),
            timeout_seconds=env.float("SMTP_TIMEOUT_SECONDS", SmtpSettings.timeout_seconds, *TIMEOUT_RANGE),
            ca_file=env.text("SMTP_CA_FILE", ""),
        )
        sns = SnsSettings(
            region=env.matching(
                "SNS_REGION",
                SnsSettings.region,
                "text",
                r"[a-z]{2}(-[a-z]+)+-\d+",
                "an AWS region in lower case, like us-east-1",
                ignore_case=False,
            ),
            endpoint_url=env.matching("SNS_ENDPOINT_URL", "", "url", r"https?://.+", "an http(s):// URL"),
            sender_id=env.matching(
                "SNS_SENDER_ID",
                "",
                "text",
                r"(?=[a-z0-9-]*[a-z])[a-z0-9-]{1,11}",
                "1 to 11 letters, digits or hyphens with at least one letter (SNS refuses any other)",
            ),
        )
        return cls(
            listen=env.address("LISTEN", cls.listen, "host:port"),
            database_url=env.matching(
                "DATABASE_URL", "", "url", r"postgres(ql)?://.+", "a postgresql:// URL"
            ),
            database_pool_size=env.int("DATABASE_POOL_SIZE", cls.database_pool_size, 1, 200),
            storage_timeout_seconds=env.float(
                "STORAGE_TIMEOUT_SECONDS", cls.storage_timeout_seconds, *TIMEOUT_RANGE
            ),
            storage_probe_seconds=env.float("STORAGE_PROBE_SECONDS", cls.storage_probe_seconds, 0.1, 3600),
            data_dir=Path(env.text("DATA_DIR", str(cls.data_dir))),
            keys=keys,
            active_key_version=active_key_version,
            broker_url=env.redis_url("BROKER_URL"),
            broker_timeout_seconds=env.float(
                "BROKER_TIMEOUT_SECONDS", cls.broker_timeout_seconds, *TIMEOUT_RANGE
            ),
            delivery_queue=env.text("DELIVERY_QUEUE", cls.delivery_queue),
            delivery_retry_base_seconds=env.float(
                "DELIVERY_RETRY_BASE_SECONDS", cls.delivery_retry_base_seconds, 0.1, 60
            ),  # at most the 60 s every retry is capped at (delivery/deliverer.py)
            outbox_recovery_seconds=env.float(
                "OUTBOX_RECOVERY_SECONDS", cls.outbox_recovery_seconds, 0.2, 3600
            ),
            delivery_lease_seconds=env.float("DELIVERY_LEASE_SECONDS", cls.delivery_lease_seconds, 1, 3600),
            email_provider=env.choice("EMAIL_PROVIDER", cls.email_provider, ("console", "smtp")),
            sms_provider=_builtin_in_lower_case(env.text("SMS_PROVIDER", cls.sms_provider)),
            smtp=smtp,
            sns=sns,
            policy=policy,
            tokens=env.tokens("TOKENS"),
            tls_cert_file=env.text("TLS_CERT_FILE", ""),
            tls_key_file=env.text("TLS_KEY_FILE", ""),
            tls_client_ca_file=env.text("TLS_CLIENT_CA_FILE", ""),
            max_workers=env.int("MAX_WORKERS", cls.max_workers, 1, 1024),
            grace_seconds=env.float("GRACE_SECONDS", cls.grace_seconds, 0.1, 3600),
            log_level=env.choice("LOG_LEVEL", cls.log_level, LOG_LEVELS),
            log_format=env.choice("LOG_FORMAT", "", ("json", "text")),
            metrics_listen=env.address("METRICS_LISTEN", "", "host:port, like :9464"),
            allow_console_delivery=env.bool("ALLOW_CONSOLE_DELIVERY", cls.allow_console_delivery),
            migrate_on_start=env.bool("MIGRATE_ON_START", cls.migrate_on_start),
            audit_retention_days=env.int("AUDIT_RETENTION_DAYS", cls.audit_retention_days, 1, 36500),
            retention_interval_seconds=env.float(
                "RETENTION_INTERVAL_SECONDS", cls.retention_interval_seconds, 0.1, 7 * 86400
            ),
        )


def check_keys(keys: str, active_version: int | None) -> Keyring:
    """The keyring of TWOFACTOR_KEYS, or a SettingsError naming the entry (never a key) that is wrong."""
    try:
        keyring = Keyring.parse(keys)
    except KeyringError as error:
        raise SettingsError(f"TWOFACTOR_KEYS: {error}") from None
    if active_version is not None and active_version not in keyring.versions:
        raise SettingsError(
            f"TWOFACTOR_ACTIVE_KEY_VERSION is {active_version}, but TWOFACTOR_KEYS has only version(s) "
            f"{', '.join(map(str, keyring.versions))}; add that key first"
        )
    return Keyring.parse(keys, active_version)


def unknown_variables() -> list[str]:
    """TWOFACTOR_* variables in the environment that no setting reads: most likely typos."""
    from twofactor_server.configuration import unknown_in

    return unknown_in(os.environ)


def effective_configuration() -> list[tuple[str, str]]:
    """(variable, effective value) of every setting from the environment, secrets masked."""
    from twofactor_server.configuration import effective_in

    return effective_in(os.environ)


def _builtin_in_lower_case(provider: str) -> str:
    """`SNS` is `sns`, as `SMTP` is `smtp` for the email provider; a class path keeps its case."""
    return provider.lower() if provider.lower() in ("console", "sns") else provider
