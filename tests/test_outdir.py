"""`prepare_out`: the output folder is checked before any work, and refused in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gradleak.cli import main
from gradleak.errors import ConfigError
from gradleak.outdir import prepare_out


def test_creates_the_folder_and_its_parents(tmp_path: Path) -> None:
    out = prepare_out(tmp_path / "a" / "b" / "c")
    assert out == tmp_path / "a" / "b" / "c" and out.is_dir()
    assert list(out.iterdir()) == []  # the write probe is gone
    (out / "kept.txt").write_text("x")
    assert prepare_out(str(out)) == out and (out / "kept.txt").read_text() == "x"


def test_refuses_a_file(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("x")
    with pytest.raises(ConfigError, match=r"^--out .*notes.txt is a file; give a folder"):
        prepare_out(file)
    assert file.read_text() == "x"


def test_refuses_a_path_inside_a_file(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("x")
    with pytest.raises(ConfigError, match=r"is inside the file .*notes.txt; give a folder"):
        prepare_out(file / "run" / "deeper")


def test_refuses_a_folder_it_cannot_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root ignores permission bits, so the file system's "no" is simulated
    # for this folder only; the real one is in the read-only mount test below.
    folder = tmp_path / "locked"
    folder.mkdir()
    real_open = os.open

    def deny(path: os.PathLike[str] | str, *args: object, **kwargs: object) -> int:
        if Path(path).parent == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(ConfigError, match=r"locked is not writable \(Permission denied\)"):
        prepare_out(folder)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare")
def test_refuses_a_read_only_mount(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    outs = (str(folder), str(folder / "new" / "sub"))
    code = (
        "from gradleak.outdir import prepare_out\n"
        "from gradleak.errors import ConfigError\n"
        f"for out in {outs!r}:\n"
        "    try:\n"
        "        prepare_out(out)\n"
        "    except ConfigError as error:\n"
        "        print(error)\n"
    )
    script = f'mount --bind -o ro "{folder}" "{folder}" || exit 77; exec "{sys.executable}" -c "$0"'
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, code], capture_output=True, text=True, timeout=60
    )
    if done.returncode == 77 or "unshare:" in done.stderr:
        pytest.skip(f"no read-only bind mount here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and all(
        "is not writable (Read-only file system)" in line for line in lines
    )


def _bad_outs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    file = tmp_path / "taken.txt"
    file.write_text("x")
    return {
        "a file": (file, "is a file"),
        "inside a file": (file / "run", "is inside the file"),
    }


@pytest.mark.parametrize("case", ["a file", "inside a file"])
@pytest.mark.parametrize("command", ["attack", "attack-text"])
def test_cli_refuses_a_bad_out_before_attacking(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    case: str,
) -> None:
    out, message = _bad_outs(tmp_path)[case]

    def no_attack(*args: object, **kwargs: object) -> None:
        raise AssertionError("the attack started before --out was checked")

    if command == "attack":  # the client step comes right before the attack
        monkeypatch.setattr("gradleak.experiments.attack.observe", no_attack)
    else:
        monkeypatch.setattr("gradleak.experiments.text.attack.attack_sentence", no_attack)
    with pytest.raises(SystemExit) as stopped:
        main([command, "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith(f"gradleak: error: --out {out} {message}")
    assert len(err.strip().splitlines()) == 1
