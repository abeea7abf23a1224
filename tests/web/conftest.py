"""Fixtures for the browser tests of examples/web.

The real twofactor server runs as a subprocess, configured like production
(keys and tokens from `twofactor keygen` and `twofactor token`) and reached only
over gRPC, so the server's internals can move without breaking these tests.
Its emails go to a real SMTP sink. The site runs in a thread of the test
process (so a test can move its clock), and Debian's Chromium drives it. One
of each serves the whole package; every test has its own users (the demo
users of examples/web, or new ones from `new_user`).
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyotp
import pytest
from flask import Flask
from flask.testing import FlaskClient
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
from werkzeug.serving import make_server
from werkzeug.test import TestResponse

from examples.web.app import create_app
from examples.web.second_factor import SecondFactor
from examples.web.settings import SiteSettings
from examples.web.users import USERS, User, hash_password
from tests.web.mailbox import CODE, Mailbox

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright never downloads a browser here
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TWOFACTOR_CLI = Path(sys.executable).with_name("twofactor")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "web"
WAIT_MS = 20_000  # every browser wait is bounded; generous for a loaded 2-core machine
START_TIMEOUT = 60.0  # seconds for the server to listen
IN_CI = os.environ.get("CI", "").lower() == "true"

expect.set_options(timeout=WAIT_MS)


def require(what: str, problem: str) -> None:
    """Without it: fail in CI (it must be there), skip on a developer's machine."""
    message = f"{what}: {problem}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    return subprocess.run(
        [str(TWOFACTOR_CLI), *args], env=env, capture_output=True, text=True, check=True, timeout=60
    ).stdout


def new_token(name: str, scopes: str) -> tuple[str, str]:
    """(token, its TWOFACTOR_TOKENS entry) from `twofactor token NAME SCOPES`."""
    lines = dict(line.split(": ", 1) for line in cli("token", name, scopes).splitlines() if ": " in line)
    return lines["token"], lines["TWOFACTOR_TOKENS entry"]


@dataclass
class TwoFactorServer:
    target: str
    app_token: str
    admin_token: str
    process: subprocess.Popen[str]
    output: list[str] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def read_output(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.changed:
                self.output.append(line)
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def lines_so_far(self) -> int:
        with self.changed:
            return len(self.output)

    def sms_code_to(self, phone: str, *, after: int, timeout: float = 30) -> str:
        """The code of the first text to `phone` that the console SMS provider printed after line `after`.

        Its block is a "To: <number>" line and, below it, the message (`make serve` shows the same).
        """

        def code() -> str | None:
            lines = self.output[after:]
            for index, line in enumerate(lines):
                if line.strip() == f"To: {phone}":
                    found = next(
                        (CODE.search(text) for text in lines[index + 1 :] if CODE.search(text)), None
                    )
                    return found.group(1) if found else None
            return None

        with self.changed:
            found = self.changed.wait_for(code, timeout)
        if found is None:
            raise AssertionError(f"no text to {phone} within {timeout}s:\n{''.join(self.output[after:])}")
        return found

    def wait_for_output(self, text: str, timeout: float) -> None:
        with self.changed:
            found = self.changed.wait_for(
                lambda: any(text in line for line in self.output) or self.process.poll() is not None, timeout
            )
            if not found or not any(text in line for line in self.output):
                raise AssertionError(f"the server did not print {text!r}:\n{''.join(self.output)}")


@pytest.fixture(scope="package")
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox(free_port())
    box.start()
    try:
        yield box
    finally:
        box.stop()


@pytest.fixture(scope="package")
def twofactor_server(tmp_path_factory: pytest.TempPathFactory, mailbox: Mailbox) -> Iterator[TwoFactorServer]:
    """`twofactor serve` with production-style secrets; 2FA forced, emails to the sink."""
    with running_twofactor_server(
        tmp_path_factory.mktemp("twofactor-data"),
        EMAIL_PROVIDER="smtp",
        SMTP_HOST="127.0.0.1",
        SMTP_PORT=str(mailbox.port),
        SMTP_SECURITY="none",
        FORCE_2FA="true",  # so a reset user must enroll again at their next login
        RESEND_COOLDOWN_SECONDS="5",  # short enough to wait out in a test
    ) as server:
        yield server


class SiteClock:
    """The site's clock: real time plus an offset a test can add to (sudo mode's window)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Site:
    url: str
    clock: SiteClock


def site_app(server: TwoFactorServer) -> tuple[Flask, SiteClock]:
    """The reference site as create_app builds it against `server`, with a clock the test moves
    (its client to twofactor is closed through app.extensions["web.second_factor"])."""
    clock = SiteClock()
    settings = SiteSettings(
        twofactor_target=server.target,
        app_token=server.app_token,
        admin_token=server.admin_token,
        secret_key=secrets.token_urlsafe(32),
    )
    return create_app(settings, clock=clock), clock


@pytest.fixture(scope="package")
def site(twofactor_server: TwoFactorServer) -> Iterator[Site]:
    app, clock = site_app(twofactor_server)
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield Site(f"http://127.0.0.1:{http.server_port}", clock)
    finally:
        http.shutdown()
        thread.join(timeout=30)
        http.server_close()
        app.extensions["web.second_factor"].close()


@pytest.fixture(autouse=True)
def _real_site_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that moves the site's clock gets it back afterwards."""
    yield
    if "site" in request.fixturenames:
        request.getfixturevalue("site").clock.offset = 0.0


@pytest.fixture(scope="package")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        require("Chromium", f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            yield chromium
        finally:
            chromium.close()


class Visitor:
    """One person's browser (its own cookies), and a screenshot of each step of theirs."""

    def __init__(self, context: BrowserContext, shots: Path, name: str) -> None:
        self.context = context
        self.page: Page = context.new_page()
        self.shots = shots
        self.name = name
        self.step = 0

    def shot(self, what: str) -> None:
        self.step += 1
        self.page.screenshot(path=self.shots / f"{self.name}-{self.step:02d}-{what}.png", full_page=True)


VisitorFactory = Callable[[str], Visitor]


@pytest.fixture
def visitor(browser: Browser, site: Site, request: pytest.FixtureRequest) -> Iterator[VisitorFactory]:
    """visitor("alice"): a new browser context; screenshots go to test-artifacts/web/<test>/."""
    shots = ARTIFACTS / request.node.name
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    contexts: list[BrowserContext] = []

    def open_visitor(name: str) -> Visitor:
        context = browser.new_context(base_url=site.url, permissions=["clipboard-read", "clipboard-write"])
        context.set_default_timeout(WAIT_MS)
        contexts.append(context)
        return Visitor(context, shots, name)

    yield open_visitor
    for context in contexts:
        context.close()


NewUser = Callable[[str], str]


@pytest.fixture
def new_user(monkeypatch: pytest.MonkeyPatch) -> NewUser:
    """new_user("erin"): a user id like "erin-1a2b3c4d" that neither the site nor twofactor knew.

    For the tests the demo users (alice, bob, carol, dave) are taken by. The site runs in
    this process, so it sees the user added to its USERS for this test; the password is
    "<user id>-demo-password", like the demo users'.
    """

    def add(name: str) -> str:
        user_id = f"{name}-{secrets.token_hex(4)}"
        user = User(user_id, f"{user_id}@example.com", hash_password(f"{user_id}-demo-password"))
        monkeypatch.setitem(USERS, user_id, user)
        return user_id

    return add


class Authenticator:
    """The user's authenticator app: a code for a time step the server hasn't accepted yet.

    The server accepts one code per 30 s step, and steps one either side of its
    own; so the next code is the current step's, or the next step's once the
    current one is spent. Only a third code within one step would have to wait.
    """

    def __init__(self, secret: str) -> None:
        self.totp = pyotp.TOTP(secret)
        self.last_step = -1

    def code(self) -> str:
        current = int(time.time() // 30)
        step = max(current, self.last_step + 1)
        if step > current + 1:  # both usable steps are spent: wait (bounded) for the clock
            time.sleep(step * 30 - 30 - time.time() + 0.1)
        self.last_step = step
        return self.totp.at(step * 30)


# -- another real server, and the site without a browser ----------------------------------------


@contextlib.contextmanager
def running_twofactor_server(data_dir: Path, **settings: str) -> Iterator[TwoFactorServer]:
    """`twofactor serve` with production-style keys and tokens and TWOFACTOR_<NAME>=value for
    each of `settings`; emails and texts go to its console unless they say otherwise."""
    app_token, app_entry = new_token("web-example", "app")
    admin_token, admin_entry = new_token("web-example-ops", "admin")
    target = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TWOFACTOR_")}
    env.update(
        TWOFACTOR_LISTEN=target,
        TWOFACTOR_DATA_DIR=str(data_dir),
        TWOFACTOR_KEYS=cli("keygen").strip(),
        TWOFACTOR_TOKENS=f"{app_entry},{admin_entry}",
        TWOFACTOR_ISSUER="Example Site",
    )
    env.update({f"TWOFACTOR_{name}": value for name, value in settings.items()})
    process = subprocess.Popen(
        [str(TWOFACTOR_CLI), "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    server = TwoFactorServer(target, app_token, admin_token, process)
    reader = threading.Thread(target=server.read_output, daemon=True)
    reader.start()
    try:
        server.wait_for_output("twofactor listening on", START_TIMEOUT)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        reader.join(timeout=30)
        assert process.stdout is not None
        process.stdout.close()


@pytest.fixture(scope="package")
def optional_twofactor_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoFactorServer]:
    """A second real `twofactor serve`, with 2FA optional (`twofactor_server` forces it): there
    the password alone signs in a user, operators included, who has no method."""
    data_dir = tmp_path_factory.mktemp("twofactor-optional-data")
    with running_twofactor_server(data_dir, FORCE_2FA="false") as server:
        yield server


FLASH = re.compile(r'<p class="flash [^"]*" role="status">(.*?)</p>', re.DOTALL)
SECRET = re.compile(r'<code id="secret">([A-Z2-7]+)</code>')


def flashes(response: TestResponse) -> list[str]:
    """The messages the page shows (its .flash paragraphs), as text."""
    return [html.unescape(message) for message in FLASH.findall(response.get_data(as_text=True))]


class SiteClient:
    """One person on the site without a browser: Flask's test client, with its own cookies.

    Forms go with the session's CSRF token, as the browser sends the page's hidden field;
    redirects are followed only when a test asks (`follow`), so it can check where they go.
    """

    def __init__(self, client: FlaskClient) -> None:
        self.client = client

    def get(self, path: str) -> TestResponse:
        return self.client.get(path)

    def post(self, path: str, /, **form: str) -> TestResponse:
        return self.open("POST", path, **form)

    def open(self, method: str, path: str, /, **form: str) -> TestResponse:
        with self.client.session_transaction() as session:
            csrf = str(session.get("csrf", ""))
        return self.client.open(path, method=method, data={"csrf_token": csrf, **form})

    def follow(self, response: TestResponse) -> TestResponse:
        assert response.status_code == 302, response.status_code
        return self.client.get(response.headers["Location"])

    def sign_in(self, user_id: str) -> str:
        """The password of a demo or `new_user` user; the page it leads to is opened, like a
        browser does, and its path returned."""
        self.get("/login")  # the form: the session gets its CSRF token
        response = self.post("/login", username=user_id, password=f"{user_id}-demo-password")
        self.follow(response)
        return response.headers["Location"]

    def enroll_authenticator(self) -> Authenticator:
        """From a user with no method (signed in, or signing in): the key read off the page, then
        the app's first code. That code is a second-factor check: sudo mode's window opens."""
        setup = self.post("/enroll/authenticator")
        found = SECRET.search(setup.get_data(as_text=True))
        assert setup.status_code == 200 and found, flashes(setup)
        app = Authenticator(found.group(1))
        done = self.post("/enroll/authenticator/confirm", code=app.code())
        assert done.status_code == 200, flashes(done)
        assert flashes(done) == ["Authenticator app is on."]
        return app


@dataclass
class ClientSite:
    """The site's app (the real SecondFactor, pointed at a real server) with a clock of its own."""

    app: Flask
    clock: SiteClock

    @property
    def second_factor(self) -> SecondFactor:
        """The site's own twofactor calls, for a test's setup and checks."""
        second_factor: SecondFactor = self.app.extensions["web.second_factor"]
        return second_factor

    def visitor(self) -> SiteClient:
        return SiteClient(self.app.test_client())


ClientSiteFactory = Callable[[TwoFactorServer], ClientSite]


@pytest.fixture
def client_site() -> Iterator[ClientSiteFactory]:
    """client_site(server): the site as create_app builds it for `site`, against `server`, driven
    through Flask's test client (no browser, no HTTP server)."""
    apps: list[Flask] = []

    def build(server: TwoFactorServer) -> ClientSite:
        app, clock = site_app(server)
        apps.append(app)
        return ClientSite(app, clock)

    yield build
    for app in apps:
        app.extensions["web.second_factor"].close()
