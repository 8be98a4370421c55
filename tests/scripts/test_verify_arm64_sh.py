"""scripts/verify_arm64.sh checks its options before it needs root or touches anything.

The emulated run itself (debootstrap, qemu, tens of minutes) is manual: docs/DEVICES.md.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "verify_arm64.sh"


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=30)


def test_help_offers_the_real_model_and_tiny() -> None:
    r = _run(["--help"])
    assert r.returncode == 0, r.stderr
    assert "--model NAME" in r.stdout
    assert "smollm2-135m (default" in r.stdout and "tiny" in r.stdout
    assert "pull,profile,train,generate,fleet" in r.stdout


def test_unknown_model_exits_2_before_anything_else(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    r = _run(["--model", "llama-70b", "--cache", str(cache)])
    assert r.returncode == 2
    assert "--model must be smollm2-135m or tiny" in r.stderr
    assert not cache.exists()
