"""Start-up settings that are checked when used: `:port` listens on every interface, an address
gRPC can't bind says why, and an unusable data directory or development secrets file is one line
that says what to do (exit status 2), never a traceback."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import base_settings
from twofactor_server.app import create_server
from twofactor_server.cli import main
from twofactor_server.settings import Settings, SettingsError


def listening_on(tmp_path: Path, listen: str) -> Settings:
    return dataclasses.replace(base_settings(tmp_path), listen=listen)


def only_env(monkeypatch: pytest.MonkeyPatch, **variables: str) -> None:
    for name in list(os.environ):
        if name.startswith("TWOFACTOR_"):
            monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(f"TWOFACTOR_{name}", value)


def test_an_address_without_a_host_listens_on_every_interface(tmp_path: Path) -> None:
    server, port = create_server(listening_on(tmp_path, ":0"))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(grace=None)


def test_a_port_another_process_holds_is_said_to_be_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SettingsError) as refused:
            create_server(listening_on(tmp_path, f"127.0.0.1:{port}"))
    assert str(refused.value) == f"could not listen on 127.0.0.1:{port} (port {port} is already in use)"


def test_an_address_of_another_machine_is_said_to_be_not_this_machines(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as refused:  # 192.0.2.0/24 is for documentation only
        create_server(listening_on(tmp_path, "192.0.2.1:0"))
    assert (
        str(refused.value) == "could not listen on 192.0.2.1:0 (192.0.2.1 is not an address of this machine)"
    )


DAMAGE: dict[str, Callable[[Path], object]] = {
    "not JSON": lambda path: path.write_text("{not json"),
    "no fields": lambda path: path.write_text("{}"),
    "a list": lambda path: path.write_text("[]"),
    "a malformed key": lambda path: path.write_text(
        '{"keys": "1:abc", "app_token": "a", "admin_token": "b"}'
    ),
    "a directory": lambda path: path.mkdir(),
}


@pytest.mark.parametrize("command", [["serve"], ["keys", "status"]], ids=" ".join)
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_an_unusable_development_secrets_file_is_one_line_saying_what_to_do(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    damage: str,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    DAMAGE[damage](data / "dev-secrets.json")
    only_env(monkeypatch, DATA_DIR=str(data), LISTEN="127.0.0.1:0", LOG_FORMAT="text")
    assert main(command) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith(
        f"twofactor: configuration error: TWOFACTOR_DATA_DIR: {data / 'dev-secrets.json'} is not a usable "
        "development secrets file ("
    )
    assert f"move {data} away" in err and "can't read data sealed with the old one" in err


@pytest.mark.parametrize("command", [["migrate"], ["keys", "status"], ["serve"]], ids=" ".join)
def test_a_data_dir_that_is_a_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("")
    only_env(monkeypatch, DATA_DIR=str(not_a_dir), LISTEN="127.0.0.1:0", LOG_FORMAT="text")
    assert main(command) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert (
        err == f"twofactor: configuration error: TWOFACTOR_DATA_DIR: {not_a_dir} is a file, not a directory\n"
    )
