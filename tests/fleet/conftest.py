"""Fixtures: a real Mosquitto on a free loopback port with a generated config."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime.fleet.mosquitto import stop_process

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto"
                                          if os.path.exists("/usr/sbin/mosquitto") else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Mosquitto:
    """A mosquitto process we own; restartable on the same port (persistence off)."""

    def __init__(self, workdir: Path, *, users: dict[str, str] | None = None,
                 acl: str | None = None, message_size_limit: int = 0) -> None:
        if MOSQUITTO is None:
            pytest.fail("mosquitto is not installed: run `bash scripts/setup.sh` as root, or "
                        "apt-get install mosquitto mosquitto-clients")
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        # as root, mosquitto would drop to user "mosquitto", who cannot read our tmp files
        lines = [f"user {getpass.getuser()}", f"listener {self.port} 127.0.0.1",
                 "persistence false",
                 "log_dest stderr", "log_type error", "log_type warning",
                 "max_queued_messages 100000"]
        if message_size_limit:
            lines.append(f"max_packet_size {message_size_limit}")
        if users is not None:
            pw = workdir / "passwd"
            pw.write_text("")
            for u, p in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pw), u, p], check=True,
                               capture_output=True, timeout=10)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines += ["allow_anonymous true"]
        if acl is not None:
            (workdir / "acl").write_text(acl)
            lines.append(f"acl_file {workdir / 'acl'}")
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert MOSQUITTO is not None
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log,
                                         stderr=log)
        wait_port(self.port)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def restart(self, down_s: float = 0.5) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    m = Mosquitto(tmp_path)
    m.start()
    try:
        yield m
    finally:
        m.stop()
