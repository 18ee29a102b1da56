"""What a Flower app's own files tell the server's operator: its run config.

A Flower app keeps its settings in ``pyproject.toml`` under
``[tool.flwr.app.config]`` (Flower's quickstart-pytorch: ``local-epochs``,
``learning-rate``, ``batch-size``), and its clients read them from
``context.run_config``.  The server's operator wrote that file, so reading it
is no extra knowledge: `schedule_from_app` turns it into the part of a
`ClientSchedule` the train config does not send.  The file is parsed as TOML
data; nothing of the app is imported.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from gradleak.errors import ConfigError, DataError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package (Flower depends on it)
    import tomli as tomllib

# Run-config keys read for each part of the schedule, first found wins.
KEYS: dict[str, tuple[str, ...]] = {
    "lr": ("lr", "learning-rate", "learning_rate", "local-lr"),
    "epochs": ("local-epochs", "local_epochs", "epochs"),
    "local_steps": ("local-steps", "local_steps"),
    "batch_size": ("batch-size", "batch_size"),
}


def read_run_config(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The ``[tool.flwr.app.config]`` table of an app folder's (or a file's) pyproject.toml.

    Raises:
        ConfigError: No such file, not TOML, or no run config in it.
    """
    path = Path(path).expanduser()
    file = path / "pyproject.toml" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"--flwr-app {path}: no pyproject.toml there; give the app's folder")
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{file} is not valid TOML ({error})") from None
    config = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if not isinstance(config, dict):
        raise ConfigError(f"{file} has no [tool.flwr.app.config] table: is it a Flower app?")
    return config, file


def schedule_from_app(path: str | Path) -> tuple[dict[str, Any], str]:
    """``{"lr": ..., "epochs": ..., "local_steps": ..., "batch_size": ...}`` found in the app.

    Returns:
        The values found (absent keys left out) and the file they came from.

    Raises:
        ConfigError: The file cannot be read, or a value is not a positive number.
    """
    config, file = read_run_config(path)
    found: dict[str, Any] = {}
    for part, names in KEYS.items():
        for name in names:
            if name not in config:
                continue
            value = config[name]
            if part == "lr":
                ok = isinstance(value, int | float) and not isinstance(value, bool)
                ok = ok and math.isfinite(value) and value > 0
            else:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            if not ok:
                raise ConfigError(f"{file}: '{name}' = {value!r} is not a valid {part}")
            found[part] = float(value) if part == "lr" else int(value)
            break
    return found, str(file)
