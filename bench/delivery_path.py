"""Where one email delivery's CPU goes, without Celery: the delivery core against PostgreSQL and SMTP.

    .venv/bin/python bench/delivery_path.py [--emails N --database-url URL]

In one process, on a fresh schema (dropped at the end), with a local SMTP sink
in a child process: queues N enrollment emails through the use cases
(SetContact, StartEnrollment(EMAIL), with a dispatcher that only records),
then runs `Deliverer.deliver` for each one after another (what a Celery task
does, without Celery), and apart from it the parts: rendering the templates,
building the message's bytes, and `SmtpEmailSender.send_email` over its kept
connection. Prints wall time and CPU per email of this process and of this
run's PostgreSQL backends. The difference between a worker's CPU per email in
`make bench` and `Deliverer.deliver` here is Celery's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import time
import uuid
from collections.abc import Callable

import psycopg
from loadgen import CpuMeter
from sink import BenchSink
from suite import PostgresPids

from twofactor_server.delivery.dispatch import build_deliverer
from twofactor_server.delivery.messages import render_email
from twofactor_server.delivery.providers import EmailMessage, SmtpEmailSender
from twofactor_server.domain.clock import system_clock
from twofactor_server.domain.keyring import Keyring
from twofactor_server.domain.models import Caller
from twofactor_server.settings import Settings, SmtpSettings
from twofactor_server.storage.database import PostgresDatabase
from twofactor_server.usecases.backup_codes import BackupCodes
from twofactor_server.usecases.challenges import Challenges
from twofactor_server.usecases.enrollment import Enrollment
from twofactor_server.usecases.notices import Notices
from twofactor_server.usecases.profiles import UserProfiles

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
CALLER = Caller(actor="bench", request_id="bench")


class RecordingDispatch:
    def __init__(self) -> None:
        self.queued: list[tuple[str, int]] = []

    def dispatch(self, challenge_id: str, generation: int = 0, *, method: str = "") -> None:
        self.queued.append((challenge_id, generation))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emails", type=int, default=300, help="deliveries to time (default 300)")
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    args = parser.parse_args(argv)
    schema = f"tf_bench_{uuid.uuid4().hex[:12]}"
    sink = BenchSink()  # its SMTP server in a child process
    sink.start()
    port = sink.port
    with psycopg.connect(args.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    url = f"{args.database_url}?options=-csearch_path%3D{schema}&application_name={schema}"
    db = PostgresDatabase(url, pool_size=2)
    try:
        db.migrate()
        with PostgresPids(args.database_url, schema) as backends:
            run(db, args.emails, port, CpuMeter(os.getpid(), [], None, backends))
    finally:
        db.close()
        sink.stop()
        with psycopg.connect(args.database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
    return 0


def run(db: PostgresDatabase, emails: int, port: int, meter: CpuMeter) -> None:
    smtp = SmtpSettings(host="127.0.0.1", port=port, security="none", from_address="bench@example.com")
    settings = dataclasses.replace(Settings(), email_provider="smtp", smtp=smtp)
    policy = dataclasses.replace(settings.policy, resend_cooldown_seconds=0, sends_per_user_per_hour=1000)
    keyring = Keyring.parse(Keyring.new_key_spec(1))
    recorder = RecordingDispatch()
    challenges = Challenges(db, keyring, policy, recorder, system_clock)
    notices = Notices(db, keyring, policy, recorder, system_clock)
    backup_codes = BackupCodes(db, keyring, policy, notices, system_clock)
    enrollment = Enrollment(db, keyring, policy, challenges, backup_codes, notices, system_clock)
    profiles = UserProfiles(db, keyring, policy, challenges, notices, system_clock)
    run_id = uuid.uuid4().hex[:8]
    for index in range(emails + 1):
        user_id = f"bench-mail-{run_id}-{index}"
        profiles.set_contact(
            user_id, email=f"{user_id}@bench.invalid", phone=None, verification_token="", caller=CALLER
        )
        enrollment.start_enrollment(
            user_id, "email", account_name="", locale="", verification_token="", caller=CALLER
        )
    deliverer = build_deliverer(settings, db=db, keyring=keyring)
    first, *rest = recorder.queued
    deliverer.deliver(*first)  # warm up: the SMTP session, the pool, the templates
    print(f"{len(rest)} emails, one after another, in this process:")
    print(
        "  Deliverer.deliver (claim, decrypt, render, build, send, record):",
        timed(meter, rest, deliverer.deliver),
    )

    subject, text, html = render_email(
        purpose="login", code="123456", issuer="bench", ttl_minutes=10, locale="en"
    )
    message = EmailMessage(to="a@bench.invalid", subject=subject, text=text, html=html, message_key="k")
    sender = SmtpEmailSender(smtp)
    sender.send_email(message)

    def render() -> object:
        return render_email(purpose="login", code="123456", issuer="bench", ttl_minutes=10, locale="en")

    def build() -> object:
        return sender._build(message)

    def send() -> object:
        return sender.send_email(message)

    for label, action in (
        ("render_email (the templates)", render),
        ("build the message (providers/mime.py; else the email package)", build),
        ("SmtpEmailSender.send_email (build + send, kept session)", send),
    ):
        print(f"  {label + ':':<66}", timed(meter, [()] * len(rest), action))


def timed(meter: CpuMeter, calls: list[tuple[object, ...]], action: Callable[..., object]) -> str:
    before, here, t0 = meter.snapshot(), _cpu(), time.perf_counter()
    for call in calls:
        action(*call)
    wall, ours, after = time.perf_counter() - t0, _cpu() - here, meter.snapshot()
    postgres = after["postgres"] - before["postgres"]
    n = len(calls)
    return (
        f"{wall / n * 1e6:7.0f} us wall, CPU {ours / n * 1e6:6.0f} us here"
        f" + {postgres / n * 1e6:5.0f} us in PostgreSQL"
    )


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    sys.exit(main())
