"""Fetching dataset files from their official sources.

Only :func:`download_dataset` is used by the readers. Every file is checked against
its published md5 before it is kept, and archives are unpacked member by member
after checking that no member escapes the target folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)

TIMEOUT_S = 15.0
_CHUNK = 1 << 20


class DownloadError(Exception):
    """A download or extraction failed; the message is one short line."""


@dataclass(frozen=True)
class Remote:
    """One file to fetch.

    Attributes:
        url: Where to get it.
        md5: Its published md5 (hex).
        folder: Destination folder relative to the data folder.
        extract: Unpack it (a .tar.gz) into ``folder`` and delete the archive.
    """

    url: str
    md5: str
    folder: str
    extract: bool = False

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_CIFAR100 = Remote(
    "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    "eb9058c3a382ffc7106e4002c42a8d85",
    "cifar100",
    extract=True,
)
_CIFAR10 = Remote(
    "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "c58f30108f718f92721af3b95e74349a",
    "cifar10",
    extract=True,
)
# The LFW archive holds a top-level lfw/ folder, so it is unpacked into the data folder.
_LFW = Remote(
    "http://vis-www.cs.umass.edu/lfw/lfw.tgz", "a17d05bd522c52d84eca14327a23d494", "", True
)

SOURCES: dict[tuple[str, str], tuple[Remote, ...]] = {
    ("mnist", "test"): (
        Remote(_MNIST + "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", "mnist"),
        Remote(_MNIST + "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", "mnist"),
    ),
    ("mnist", "train"): (
        Remote(_MNIST + "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", "mnist"),
        Remote(_MNIST + "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcc592d170e", "mnist"),
    ),
    ("cifar100", "test"): (_CIFAR100,),
    ("cifar100", "train"): (_CIFAR100,),
    ("cifar10", "test"): (_CIFAR10,),
    ("cifar10", "train"): (_CIFAR10,),
    ("svhn", "test"): (
        Remote(
            "http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
            "eb5a983be6a315427106f1b164d9cef3",
            "svhn",
        ),
    ),
    ("svhn", "train"): (
        Remote(
            "http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
            "e26dedcc434d2e4c54c9b2d4a06d8373",
            "svhn",
        ),
    ),
    ("lfw", "test"): (_LFW,),
    ("lfw", "train"): (_LFW,),
}


def download_dataset(name: str, split: str, data_dir: Path) -> None:
    """Fetch (and unpack) the files of ``name``/``split`` into ``data_dir``.

    Raises:
        DownloadError: On a network error, a checksum mismatch or an unsafe archive.
    """
    remotes = SOURCES.get((name, split))
    if remotes is None:
        raise DownloadError(f"no download source is known for {name} {split}")
    for remote in remotes:
        folder = data_dir / remote.folder if remote.folder else data_dir
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DownloadError(f"cannot create {folder}: {exc.strerror or exc}") from exc
        target = folder / remote.filename
        fetch(remote.url, target, remote.md5)
        if remote.extract:
            extract_tar(target, folder)
            target.unlink(missing_ok=True)


def fetch(url: str, target: Path, md5: str) -> None:
    """Download ``url`` to ``target`` if its md5 equals ``md5``; leave nothing behind otherwise.

    The data goes to ``target.part`` first and is renamed only once verified, so an
    interrupted download never looks like a finished file.

    Raises:
        DownloadError: On a network/disk error or a checksum mismatch.
    """
    part = target.with_name(target.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
    log.info("downloading %s -> %s", url, target)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, part.open("wb") as out:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"{url}: {reason}") from exc
    if digest.hexdigest() != md5.lower():
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"{url}: checksum mismatch (md5 {digest.hexdigest()}, expected {md5}); try again later"
        )
    os.replace(part, target)


def _safe_member_path(member: tarfile.TarInfo, dest: Path) -> Path:
    pure = PurePosixPath(member.name)
    if pure.is_absolute() or ".." in pure.parts:
        raise DownloadError(f"refusing unsafe archive member {member.name!r}")
    resolved = (dest / pure).resolve()
    if resolved != dest and dest not in resolved.parents:
        raise DownloadError(f"refusing unsafe archive member {member.name!r}")
    return resolved


def extract_tar(archive: Path, dest: Path) -> None:
    """Unpack the regular files and folders of a tar archive into ``dest``.

    Links, devices and members whose path would leave ``dest`` are refused rather
    than trusted, whatever the Python version's own tarfile filters do.

    Raises:
        DownloadError: If the archive is unreadable or has an unsafe member.
    """
    dest = dest.resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                path = _safe_member_path(member, dest)
                if member.isdir():
                    path.mkdir(parents=True, exist_ok=True)
                elif member.isfile():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    if source is None:
                        raise DownloadError(f"cannot read archive member {member.name!r}")
                    with source, path.open("wb") as out:
                        shutil.copyfileobj(source, out, _CHUNK)
                else:
                    raise DownloadError(
                        f"refusing archive member {member.name!r}: not a file or folder"
                    )
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DownloadError(f"cannot unpack {archive}: {exc}") from exc
