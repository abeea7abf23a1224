"""`twofactor serve --processes N`: children on one port, SIGTERM drains them all, a taken port fails."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twofactor.v1 import twofactor_service_pb2 as pb
from twofactor.v1 import twofactor_service_pb2_grpc

from tests.conftest import APP_TOKEN, TEST_KEYS
from tests.server.test_cli import TWOFACTOR, env_for, wait_until_a_query_waits_on_a_lock
from tests.smtp_sink import free_port
from twofactor_server import cli
from twofactor_server.settings import SettingsError
from twofactor_server.supervisor import reserve_port

METADATA = (("authorization", f"Bearer {APP_TOKEN}"),)


def production_env(tmp_path: Path, postgres_url: str, port: int) -> dict[str, str]:
    return env_for(
        tmp_path,
        LISTEN=f"127.0.0.1:{port}",
        DATABASE_URL=postgres_url,
        KEYS=TEST_KEYS,
        TOKENS=f"backend:app:{hashlib.sha256(APP_TOKEN.encode()).hexdigest()}",
        ALLOW_CONSOLE_DELIVERY="true",
    )


class Supervised:
    """`twofactor serve --processes N` in a subprocess, read up to its `listening on` line."""

    def __init__(self, env: dict[str, str], processes: str) -> None:
        self.process = subprocess.Popen(
            [TWOFACTOR, "serve", "--processes", processes],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.read_until("twofactor listening on")

    def read_until(self, prefix: str) -> str:
        assert self.process.stdout is not None
        for line in self.process.stdout:  # ends if the process exits; pytest-timeout bounds it
            self.lines.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"exited before printing {prefix!r}: {''.join(self.lines)}")

    def children(self) -> list[int]:
        found = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, timeout=30
        ).stdout.split()
        return [int(pid) for pid in found]

    def finish(self) -> tuple[int, str]:
        out, _ = self.process.communicate(timeout=120)
        return self.process.returncode, "".join(self.lines) + out


def listening_inodes(port: int) -> set[str]:
    """Socket inodes in LISTEN state on `port`, from /proc/net/tcp and tcp6 (gRPC listens on IPv6
    sockets with IPv4-mapped addresses)."""
    inodes = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as table:
            next(table)
            for line in table:
                fields = line.split()
                if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == "0A":
                    inodes.add(fields[9])
    return inodes


def socket_inodes(pid: int) -> set[str]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[len("socket:[") : -1])
    return found


def test_every_child_listens_on_the_one_port_and_answers(tmp_path: Path, postgres_url: str) -> None:
    port = free_port()
    served = Supervised(production_env(tmp_path, postgres_url, port), "2")
    try:
        children = served.children()
        assert len(children) == 2
        listening = listening_inodes(port)
        # Each child holds a listening socket of the port's SO_REUSEPORT group; the supervisor none.
        assert all(socket_inodes(child) & listening for child in children), (children, listening)
        assert not socket_inodes(served.process.pid) & listening
        for _ in range(4):  # new connections: the kernel spreads them over the children
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=10
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        served.process.send_signal(signal.SIGTERM)
    code, output = served.finish()
    assert code == 0, output
    assert "Traceback" not in output


def test_sigterm_drains_the_in_flight_calls_of_the_children(tmp_path: Path, postgres_url: str) -> None:
    port = free_port()
    served = Supervised(production_env(tmp_path, postgres_url, port), "2")
    children = served.children()
    with (
        grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
        psycopg.connect(postgres_url) as blocker,
    ):
        stub = twofactor_service_pb2_grpc.TwoFactorServiceStub(channel)
        stub.SetContact(pb.SetContactRequest(user_id="drain"), metadata=METADATA, timeout=10)
        # Hold the user's row lock, so the next call waits inside whichever child took it.
        blocker.execute("SELECT 1 FROM users WHERE user_id = 'drain' FOR UPDATE")
        future = stub.SetContact.future(
            pb.SetContactRequest(user_id="drain", email="d@example.com"), metadata=METADATA, timeout=60
        )
        wait_until_a_query_waits_on_a_lock(blocker)
        served.process.send_signal(signal.SIGTERM)
        served.read_until("draining")
        assert not future.done()
        blocker.commit()  # the in-flight call can now finish
        response = future.result(timeout=60)
    assert response.masked_email == "d***@example.com"
    code, output = served.finish()
    assert code == 0, output
    # Every child drained and stopped (each prints `stopped`), then the supervisor.
    assert output.splitlines().count("stopped") == 3, output
    assert not any(Path(f"/proc/{child}").exists() for child in children)  # reaped by the supervisor


@pytest.mark.parametrize("reuseport", [False, True], ids=["plain", "so_reuseport"])
def test_a_port_another_program_holds_fails_at_start(
    tmp_path: Path, postgres_url: str, reuseport: bool
) -> None:
    """Another program's listener fails the start, even one that sets SO_REUSEPORT itself (the
    kernel would otherwise share the port with it and split the calls between the two)."""
    with socket.socket() as other:
        if reuseport:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        result = subprocess.run(
            [TWOFACTOR, "serve", "--processes", "2"],
            env=production_env(tmp_path, postgres_url, port),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2
    assert f"could not listen on 127.0.0.1:{port}" in result.stderr
    assert "another program holds the port" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_processes_must_be_a_count_or_auto(tmp_path: Path, postgres_url: str) -> None:
    result = subprocess.run(
        [TWOFACTOR, "serve", "--processes", "many"],
        env=production_env(tmp_path, postgres_url, free_port()),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--processes takes a number from 1 to 256 or 'auto', got 'many'" in result.stderr


def test_a_configuration_a_child_refuses_at_start_is_exit_status_2(tmp_path: Path, postgres_url: str) -> None:
    """As `twofactor serve` alone: here a database the migrations have not reached (README,
    Upgrades: exit status 2), with migrations at start turned off."""
    env = {**production_env(tmp_path, postgres_url, free_port()), "TWOFACTOR_MIGRATE_ON_START": "false"}
    result = subprocess.run(
        [TWOFACTOR, "serve", "--processes", "2"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "twofactor migrate" in result.stdout + result.stderr


def test_a_child_that_dies_stops_the_others_and_the_supervisor_fails(
    tmp_path: Path, postgres_url: str
) -> None:
    served = Supervised(production_env(tmp_path, postgres_url, free_port()), "2")
    first, second = served.children()
    os.kill(first, signal.SIGKILL)
    code, output = served.finish()
    assert code == 1
    assert f"server process {first} exited with status -9; stopping the others" in output
    assert not Path(f"/proc/{second}").exists()  # drained, stopped and reaped


def test_one_metrics_port_counts_the_calls_of_every_child(tmp_path: Path, postgres_url: str) -> None:
    port, metrics_port = free_port(), free_port()
    env = production_env(tmp_path, postgres_url, port)
    env["TWOFACTOR_METRICS_LISTEN"] = f"127.0.0.1:{metrics_port}"
    served = Supervised(env, "2")
    calls = 20
    try:
        for _ in range(calls):  # a new connection each: the kernel spreads them over the children
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=10
                )
        directories = {
            entry.split("=", 1)[1]
            for child in served.children()
            for entry in Path(f"/proc/{child}/environ").read_text().split("\0")
            if entry.startswith("PROMETHEUS_MULTIPROC_DIR=")
        }
        [directory] = directories  # one directory, shared by the children
        writers = {path.stem.rpartition("_")[2] for path in Path(directory).glob("counter_*.db")}
        assert {str(child) for child in served.children()} <= writers
        scrape = (
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        )
    finally:
        served.process.send_signal(signal.SIGTERM)
    handled = [
        line
        for line in scrape.splitlines()
        if line.startswith("grpc_server_handled_total{")
        and 'grpc_service="grpc.health.v1.Health"' in line
        and 'grpc_method="Check"' in line
    ]
    assert handled and sum(float(line.rsplit(" ", 1)[1]) for line in handled) == calls, scrape
    code, output = served.finish()
    assert code == 0, output
    assert not Path(directory).exists()  # removed at the end


def gone(pid: int) -> bool:
    """Exited (reaped, or a zombie its new parent has not reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_children_of_a_killed_supervisor_stop_and_free_the_port(tmp_path: Path, postgres_url: str) -> None:
    """SIGKILL reaches the supervisor alone (an operator's kill -9, a process manager that signals
    the main pid): its children stop on their own, and the port is free for the next start."""
    port = free_port()
    served = Supervised(production_env(tmp_path, postgres_url, port), "2")
    children = served.children()
    assert len(children) == 2
    served.process.kill()
    code, output = served.finish()  # read to its end: the children's stderr is the same pipe
    assert code == -signal.SIGKILL
    deadline = time.monotonic() + 60
    while not (all(gone(child) for child in children) and port_is_free(port)):
        assert time.monotonic() < deadline, f"children {children} still serve port {port}"
        time.sleep(0.05)
    assert output.count("the supervisor is gone; draining in-flight calls and stopping") == 2, output
    assert "Traceback" not in output


def test_a_stop_while_the_children_start_is_a_clean_stop(tmp_path: Path, postgres_url: str) -> None:
    """SIGTERM before the children listen (systemd stopping a unit that is starting): exit 0."""
    process = subprocess.Popen(
        [TWOFACTOR, "serve", "--processes", "2"],
        env=production_env(tmp_path, postgres_url, free_port()),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while (
        len(subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, timeout=30).stdout.split())
        < 2
    ):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)  # the children are importing, or making their server
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "Traceback" not in output


def test_a_time_wait_on_the_port_is_not_another_program(tmp_path: Path, postgres_url: str) -> None:
    """A server that stopped a moment ago (`serve` alone binds as here: SO_REUSEADDR, no
    SO_REUSEPORT) closed a connection first: TIME_WAIT on the port for 60 s, no program holds it."""
    port = free_port()
    with socket.socket() as previous:
        previous.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        previous.bind(("127.0.0.1", port))
        previous.listen()
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = previous.accept()
            accepted.close()  # the server closes first (its stop, a GOAWAY)
            assert client.recv(1) == b""
    served = Supervised(production_env(tmp_path, postgres_url, port), "2")
    served.process.send_signal(signal.SIGTERM)
    code, output = served.finish()
    assert code == 0, output


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_children_stop_when_nobody_reads_the_supervisors_output(
    tmp_path: Path, postgres_url: str, stop: signal.Signals
) -> None:
    """The reader of the supervisor's output is gone (`| tee` stopped, a runner that timed out)."""
    port = free_port()
    served = Supervised(production_env(tmp_path, postgres_url, port), "2")
    children = served.children()
    assert served.process.stdout is not None
    served.process.stdout.close()
    served.process.send_signal(stop)
    served.process.wait(timeout=60)
    deadline = time.monotonic() + 45
    while not (all(gone(child) for child in children) and port_is_free(port)):
        if time.monotonic() > deadline:
            left = [child for child in children if not gone(child)]
            for child in left:
                os.kill(child, signal.SIGKILL)  # clean up the orphans
            pytest.fail(
                f"children {left} still serve port {port} (supervisor status {served.process.returncode})"
            )
        time.sleep(0.1)


def test_no_usable_metrics_directory_is_one_line_and_status_2(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No writable temporary directory (a read-only root file system): one line, exit 2, as a bad setting."""
    for name, value in production_env(tmp_path, postgres_url, free_port()).items():
        if name.startswith("TWOFACTOR_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("TWOFACTOR_METRICS_LISTEN", f"127.0.0.1:{free_port()}")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "read-only-root"))  # what gettempdir() found
    assert cli.main(["serve", "--processes", "2"]) == 2
    assert "TWOFACTOR_METRICS_LISTEN" in capsys.readouterr().err


def test_a_setting_the_children_refuse_is_one_line(tmp_path: Path, postgres_url: str) -> None:
    """README: a bad setting stops `serve` with one line naming the variable and exit status 2;
    with three processes too (the first child starts alone), and a mistyped variable is warned
    about once (by the supervisor)."""
    env = production_env(tmp_path, postgres_url, free_port())
    env["TWOFACTOR_KEYZ"] = env.pop("TWOFACTOR_KEYS")
    result = subprocess.run(
        [TWOFACTOR, "serve", "--processes", "3"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert [line for line in lines if "TWOFACTOR_KEYZ" in line] == [
        line for line in lines if "TWOFACTOR_KEYZ is not a twofactor setting and is ignored (a typo?)" in line
    ]
    assert len([line for line in lines if "TWOFACTOR_KEYZ" in line]) == 1, result.stderr
    assert [line for line in lines if "TWOFACTOR_KEYS" in line] == [
        "twofactor: configuration error: TWOFACTOR_KEYS is required with TWOFACTOR_DATABASE_URL "
        "(run `twofactor keygen`)"
    ], result.stderr


def test_a_second_supervisor_is_refused_while_the_first_ones_children_start() -> None:
    """The port the supervisor holds (bound, not listening, while its first child migrates) is
    another program's to a second supervisor: it must not bind beside it and split the calls."""
    first, listen = reserve_port("127.0.0.1:0")
    with first, pytest.raises(SettingsError, match="another program holds the port"):
        second, _ = reserve_port(listen)
        second.close()
