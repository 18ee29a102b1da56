"""Where dataset files are looked for, and when a missing one is downloaded."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from gradleak.data import download
from gradleak.errors import DataError

log = logging.getLogger(__name__)

T = TypeVar("T")

DATA_ENV = "GRADLEAK_DATA"
NO_DOWNLOAD_ENV = "GRADLEAK_NO_DOWNLOAD"


def default_data_dir() -> Path:
    """Return ``$GRADLEAK_DATA`` if set, else ``~/.cache/gradleak/data``."""
    env = os.environ.get(DATA_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "gradleak" / "data"


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """Turn the user's ``data_dir`` argument into a path (the default when ``None``)."""
    if data_dir is None or str(data_dir) == "":
        return default_data_dir()
    return Path(data_dir).expanduser()


def candidate_dirs(data_dir: Path, name: str, subfolder: str | None) -> list[Path]:
    """Folders searched, in order, for a dataset's files.

    ``data_dir``, ``data_dir/<subfolder>``, ``data_dir/<name>``, ``data_dir/<name>/<subfolder>``,
    without duplicates, so both the top-level data folder and a dataset's own folder work.
    """
    dirs = [data_dir]
    if subfolder:
        dirs.append(data_dir / subfolder)
    dirs.append(data_dir / name)
    if subfolder:
        dirs.append(data_dir / name / subfolder)
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def _env_blocks_download() -> bool:
    value = os.environ.get(NO_DOWNLOAD_ENV, "").strip().lower()
    return value not in ("", "0", "false", "no")


def locate(
    name: str,
    split: str,
    data_dir: Path,
    *,
    find: Callable[[Path], T | None],
    missing: str,
    download_flag: bool | None,
) -> T:
    """Find a dataset's files, downloading them first if allowed and needed.

    Args:
        name: Dataset name (a key of the download table).
        split: ``"test"`` or ``"train"``.
        data_dir: The data folder.
        find: Returns what the reader needs (paths) or ``None`` if the files are absent.
        missing: The one-line "not found, put X in Y" message.
        download_flag: ``True``/``False`` forces downloading on/off; ``None`` means on
            unless ``$GRADLEAK_NO_DOWNLOAD`` is set.

    Returns:
        What ``find`` returned.

    Raises:
        DataError: If the files are absent and could not be downloaded.
    """
    found = find(data_dir)
    if found is not None:
        return found
    if download_flag is None and _env_blocks_download():
        raise DataError(f"{missing} (automatic download is off: {NO_DOWNLOAD_ENV} is set)")
    if download_flag is False:
        raise DataError(missing)
    try:
        download.download_dataset(name, split, data_dir)
    except download.DownloadError as exc:
        raise DataError(f"{missing} (download failed: {exc})") from exc
    found = find(data_dir)
    if found is None:
        raise DataError(f"{missing} (the download finished but the files are still missing)")
    log.info("downloaded %s %s into %s", name, split, data_dir)
    return found
