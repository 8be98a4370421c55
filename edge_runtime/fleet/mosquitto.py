"""A Mosquitto broker started for one local run, configured as a production fleet's.

`edge-rt demo` and the simulator's MQTT transport use it when the `mosquitto` binary is
installed (the embedded broker of `fleet/broker.py` is the fallback): a generated config
in a private folder with a password file holding one user per device plus the
aggregator (random passwords), the production ACL (`fleet_acl`, the rules of
deploy/mosquitto/aclfile: a device writes only below its own topic), a loopback
listener on a free port, no persistence. `stop()` (or leaving the `with` block, which
Ctrl-C does) terminates it; the folder goes with it.
"""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from edge_runtime.errors import UserError

__all__ = ["find_mosquitto", "fleet_acl", "LocalMosquitto", "AGGREGATOR_USER", "stop_process"]

AGGREGATOR_USER = "aggregator"


def find_mosquitto() -> str | None:
    """The mosquitto binary, or None: `$EDGE_RT_MOSQUITTO` if set (a path; `none` or empty:
    do not use Mosquitto), else PATH, else Debian's /usr/sbin/mosquitto."""
    env = os.environ.get("EDGE_RT_MOSQUITTO")
    if env is not None:
        return None if env.strip().lower() in ("", "none") else env
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def fleet_acl(prefix: str = "edge-rt") -> str:
    """The per-device ACL (docs/PROTOCOL.md topics): %u is the connecting username, which
    is the device id, so a device writes only below PREFIX/<fleet>/dev/<its id>/ and reads
    its own acks and what the aggregator publishes; the aggregator reads and writes all."""
    return (f"pattern write {prefix}/+/dev/%u/#\n"
            f"pattern read {prefix}/+/dev/%u/ack\n"
            f"pattern read {prefix}/+/agg/#\n\n"
            f"user {AGGREGATOR_USER}\n"
            f"topic readwrite {prefix}/#\n")


def stop_process(proc: subprocess.Popen[bytes] | None, timeout_s: float = 5.0) -> None:
    """Terminate a child (SIGTERM, then SIGKILL after `timeout_s`) if it still runs."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalMosquitto:
    """A mosquitto child process on 127.0.0.1 with per-user passwords and the fleet ACL.

    Args:
        users: usernames to create (device ids); the aggregator user is always added.
        prefix: topic prefix the ACL is written for.
        max_packet_size: larger packets are refused (0: Mosquitto's default).
    """

    def __init__(self, users: list[str], *, prefix: str = "edge-rt",
                 max_packet_size: int = 0) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise UserError("mosquitto is not installed (apt-get install mosquitto "
                            "mosquitto-clients); without it the embedded broker is used")
        self.binary = binary
        self.passwords = {u: secrets.token_urlsafe(12) for u in [AGGREGATOR_USER, *users]}
        self.prefix = prefix
        self.max_packet_size = max_packet_size
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def workdir(self) -> Path:
        assert self._dir is not None, "start() first"
        return Path(self._dir.name)

    def version(self) -> str:
        """`mosquitto -h`'s first line (e.g. 'mosquitto version 2.0.21')."""
        try:
            out = subprocess.run([self.binary, "-h"], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return "mosquitto"
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) \
            else "mosquitto"

    def _write_config(self, d: Path) -> Path:
        pw = d / "passwd"
        pw.write_text("")
        pw.chmod(0o600)  # in a 0700 folder; plain text only until -U hashes it in place
        pw.write_text("".join(f"{u}:{p}\n" for u, p in self.passwords.items()))
        passwd_tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        try:  # one call for all users (one `-b` call per user took ~5 s at 1,000 devices)
            subprocess.run([passwd_tool, "-U", str(pw)], check=True, capture_output=True,
                           timeout=60)
        except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            raise UserError(f"mosquitto_passwd failed ({e}); install mosquitto-clients "
                            "or pass --broker URL") from None
        (d / "acl").write_text(fleet_acl(self.prefix))
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous false",
                 f"password_file {pw}", f"acl_file {d / 'acl'}", "persistence false",
                 "log_dest stderr", "log_type error", "log_type warning",
                 "max_queued_messages 100000", "max_inflight_messages 64"]
        if os.geteuid() == 0:  # as root mosquitto would drop to a user that cannot read d
            lines.insert(0, f"user {getpass.getuser()}")
        if self.max_packet_size:
            lines.append(f"max_packet_size {self.max_packet_size}")
        conf = d / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout_s: float = 10.0) -> LocalMosquitto:
        self._dir = tempfile.TemporaryDirectory(prefix="edge-rt-mosquitto-")
        d = self.workdir
        d.chmod(0o700)
        self.port = _free_port()
        conf = self._write_config(d)
        log = open(d / "mosquitto.log", "wb")  # noqa: SIM115 - held by the child
        self.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)
        log.close()
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                text = (d / "mosquitto.log").read_text(errors="replace")[-500:]
                self.stop()
                raise UserError(f"mosquitto exited at start ({text.strip()}); pass --broker URL "
                                "to use another broker")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise UserError(f"mosquitto did not listen on port {self.port} within {timeout_s} s")

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> LocalMosquitto:
        return self.start() if self.proc is None else self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
