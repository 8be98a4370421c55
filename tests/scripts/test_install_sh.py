"""scripts/install.sh refuses 32-bit userlands and bad flags before touching anything.

The platform is faked with `uname`/`dpkg`/`getconf` shims on PATH; no network, no apt, a
few hundred milliseconds. The full install is exercised by scripts/verify_arm64.sh (manual,
emulated arm64) because it downloads torch.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install.sh"


def _shims(tmp_path: Path, machine: str, arch: str, bits: str) -> dict[str, str]:
    shim = tmp_path / "shim"
    shim.mkdir()
    scripts = {
        "uname": f'#!/bin/sh\nif [ "$1" = -m ]; then echo {machine}; else exec /bin/uname "$@"; fi\n',
        "dpkg": f"#!/bin/sh\necho {arch}\n",
        "getconf": f"#!/bin/sh\necho {bits}\n",
    }
    for name, text in scripts.items():
        (shim / name).write_text(text)
        (shim / name).chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{shim}:{env['PATH']}"
    return env


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=30)


@pytest.mark.parametrize(
    ("machine", "arch", "bits"),
    [
        ("armv7l", "armhf", "32"),   # Raspberry Pi OS 32-bit on a 32-bit kernel
        ("aarch64", "armhf", "32"),  # Raspberry Pi OS 32-bit on a Pi 4/5's 64-bit kernel
        ("armv6l", "armhf", "32"),   # Pi Zero / Pi 1
        ("armv8l", "arm", "32"),     # 32-bit Termux on a 64-bit CPU
    ],
)
def test_32bit_userland_is_refused_with_instructions(
    tmp_path: Path, machine: str, arch: str, bits: str
) -> None:
    home = tmp_path / "home"
    r = _run(["--home", str(home), "--no-apt"], _shims(tmp_path, machine, arch, bits))
    assert r.returncode == 3, r.stderr
    assert "32-bit" in r.stderr and "Raspberry Pi OS (64-bit)" in r.stderr
    assert f"uname -m: {machine}" in r.stderr
    assert not home.exists()  # refused before creating anything


def test_64bit_userland_passes_the_check(tmp_path: Path) -> None:
    # arm64 userland: the check passes and the script goes on to the system packages; a
    # dpkg-query shim reports every package missing, so --no-apt stops it there (exit 1).
    env = _shims(tmp_path, "aarch64", "arm64", "64")
    env["PATH"] = f"{tmp_path / 'shim'}:/usr/bin:/bin"
    (tmp_path / "shim" / "dpkg-query").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "shim" / "dpkg-query").chmod(0o755)
    r = _run(["--home", str(tmp_path / "home"), "--no-apt"], env)
    assert r.returncode == 1, r.stderr
    assert "missing system packages: python3 python3-venv python3-pip ca-certificates" in r.stderr
    assert "--no-apt given" in r.stderr


def test_unknown_flag_exits_2() -> None:
    r = _run(["--frobnicate"])
    assert r.returncode == 2
    assert "unknown option --frobnicate" in r.stderr


def test_help_lists_the_torch_override() -> None:
    r = _run(["--help"])
    assert r.returncode == 0
    assert "--torch-index" in r.stdout and "download.pytorch.org/whl/cpu" in r.stdout
