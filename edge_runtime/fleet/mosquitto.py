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
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from edge_runtime.errors import UserError

__all__ = ["find_mosquitto", "fleet_acl", "LocalMosquitto", "AGGREGATOR_USER", "stop_process",
           "bridge_block", "make_test_ca", "Bridge"]

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


def fleet_acl(prefix: str = "edge-rt", sites: list[str] | tuple[str, ...] = ()) -> str:
    """The per-device ACL (docs/PROTOCOL.md topics): %u is the connecting username, which
    is the device id, so a device writes only below PREFIX/<fleet>/dev/<its id>/ and reads
    its own acks and what the aggregator publishes; the aggregator reads and writes all.

    `sites`: usernames of site brokers' bridges (a root broker's ACL): a bridge forwards
    its devices' registrations and presence up, writes only its own site's partials and
    reads its own acks and the devices' (register refusals)."""
    text = (f"pattern write {prefix}/+/dev/%u/#\n"
            f"pattern read {prefix}/+/dev/%u/ack\n"
            f"pattern read {prefix}/+/agg/#\n\n"
            f"user {AGGREGATOR_USER}\n"
            f"topic readwrite {prefix}/#\n")
    for site in sites:
        text += (f"\nuser {site}\n"
                 f"topic write {prefix}/+/dev/+/register\n"
                 f"topic write {prefix}/+/dev/+/presence\n"
                 f"topic read {prefix}/+/dev/+/ack\n"
                 f"topic write {prefix}/+/site/{site}/up/#\n"
                 f"topic read {prefix}/+/site/{site}/ack\n")
    return text


def bridge_block(site: str, address: str, password: str, cafile: str | None,
                 prefix: str = "edge-rt") -> str:
    """The `connection` block that bridges a site broker to the root broker at `address`
    (host:port; TLS when `cafile` is given) as user `site` (docs/SCALING.md): the root's
    rounds, whole global and acks come in; the site's registrations, presence and
    partial sums go out; device updates stay on the site broker."""
    lines = [f"connection edge-rt-{site}", f"address {address}",
             f"remote_clientid edge-rt-bridge-{site}", f"remote_username {site}",
             f"remote_password {password}", "cleansession false", "try_private true",
             "notifications false", "restart_timeout 1 10",
             f"topic {prefix}/+/agg/# in 1", f"topic {prefix}/+/dev/+/ack in 1",
             f"topic {prefix}/+/site/{site}/ack in 1",
             f"topic {prefix}/+/dev/+/register out 1", f"topic {prefix}/+/dev/+/presence out 1",
             f"topic {prefix}/+/site/{site}/up/# out 1"]
    if cafile:
        lines += [f"bridge_cafile {cafile}", "bridge_tls_version tlsv1.2"]
    return "\n".join(lines) + "\n"


def make_test_ca(d: Path, host: str = "127.0.0.1") -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for `host` (IP SAN) with openssl:
    (ca.crt, server.crt, server.key) in `d`. For local runs and tests only."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise UserError("openssl is not installed (apt-get install openssl); it makes the "
                        "bridge's test certificates")
    ca_key, ca, key, csr, crt = (d / n for n in ("ca.key", "ca.crt", "server.key",
                                                 "server.csr", "server.crt"))
    ext = d / "san.ext"
    ext.write_text(f"subjectAltName=IP:{host}\n")
    steps = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=edge-rt test CA", "-keyout", str(ca_key), "-out", str(ca)],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={host}",
         "-keyout", str(key), "-out", str(csr)],
        [openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(crt)],
    ]
    for cmd in steps:
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=60)
        except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            raise UserError(f"openssl failed making test certificates ({e})") from None
    return ca, crt, key


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


@dataclass(frozen=True)
class Bridge:
    """Where a site broker bridges to: the root's TLS listener and the site's credentials."""

    site: str
    address: str  # host:port
    password: str
    cafile: str | None


class LocalMosquitto:
    """A mosquitto child process on 127.0.0.1 with per-user passwords and the fleet ACL.

    Args:
        users: usernames to create (device ids); the aggregator user is always added.
        prefix: topic prefix the ACL is written for.
        max_packet_size: larger packets are refused (0: Mosquitto's default).
        sites: a root broker's bridge users (site ids; `fleet_acl`).
        tls: also listen with TLS (a throwaway CA, `make_test_ca`) on `tls_port`, where
            bridges connect.
        bridge: bridge this broker to a root broker (a site broker).
    """

    def __init__(self, users: list[str], *, prefix: str = "edge-rt",
                 max_packet_size: int = 0, sites: list[str] | tuple[str, ...] = (),
                 tls: bool = False, bridge: Bridge | None = None) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise UserError("mosquitto is not installed (apt-get install mosquitto "
                            "mosquitto-clients); without it the embedded broker is used")
        self.binary = binary
        self.passwords = {u: secrets.token_urlsafe(12)
                          for u in [AGGREGATOR_USER, *users, *sites]}
        self.sites = tuple(sites)
        self.tls = tls
        self.bridge = bridge
        self.tls_port = 0
        self.prefix = prefix
        self.max_packet_size = max_packet_size
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def cafile(self) -> Path:
        """The CA of the TLS listener (`tls=True`)."""
        return self.workdir / "ca.crt"

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
        (d / "acl").write_text(fleet_acl(self.prefix, self.sites))
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous false",
                 f"password_file {pw}", f"acl_file {d / 'acl'}", "persistence false",
                 "log_dest stderr", "log_type error", "log_type warning",
                 "max_queued_messages 100000", "max_inflight_messages 64"]
        if os.geteuid() == 0:  # as root mosquitto would drop to a user that cannot read d
            lines.insert(0, f"user {getpass.getuser()}")
        if self.max_packet_size:
            lines.append(f"max_packet_size {self.max_packet_size}")
        if self.tls:
            ca, crt, key = make_test_ca(d)
            lines += [f"listener {self.tls_port} 127.0.0.1", f"cafile {ca}",
                      f"certfile {crt}", f"keyfile {key}", "tls_version tlsv1.2"]
        if self.bridge is not None:
            b = self.bridge
            lines.append(bridge_block(b.site, b.address, b.password, b.cafile, self.prefix))
        conf = d / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def start(self, timeout_s: float = 10.0) -> LocalMosquitto:
        self._dir = tempfile.TemporaryDirectory(prefix="edge-rt-mosquitto-")
        d = self.workdir
        d.chmod(0o700)
        self.port = _free_port()
        self.tls_port = _free_port() if self.tls else 0
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
