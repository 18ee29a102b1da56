"""The output folder of a command, checked before any work is done.

An attack can run for minutes; finding only when writing its results that
``--out`` names a file, or a folder nobody can write to, loses it.  Every
command calls `prepare_out` first.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from gradleak.errors import ConfigError

PROBE_PREFIX = ".gradleak-write-test-"


def prepare_out(path: str | os.PathLike[str]) -> Path:
    """Create the folder `path` (parents too) and check that files can be written in it.

    Returns:
        The folder, as a `Path`.

    Raises:
        ConfigError: `path` is a file, lies inside a file, or cannot be written.
    """
    out = Path(path).expanduser()
    try:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {path} is a file; give a folder (new or existing) instead")
        inside = next((parent for parent in out.parents if parent.exists()), None)
        if inside is not None and not inside.is_dir():
            raise ConfigError(
                f"--out {path} is inside the file {inside}; give a folder that is not inside a file"
            )
        out.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=out)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(
            f"--out {path} is not writable ({reason}); give a folder you can write to"
        ) from None
    return out
