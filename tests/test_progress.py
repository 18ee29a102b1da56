"""The attack commands' bars end where the attack stopped, with the loss metrics.json has."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress

import gradleak.cli.attack
import gradleak.cli.text
from gradleak.cli import main
from gradleak.cli.common import finish_loss_bar, loss_bar


def _record_bars(
    monkeypatch: pytest.MonkeyPatch, module: object, name: str = "loss_bar"
) -> list[Progress]:
    """Record the bars `module` makes with its function `name` (the real one, called)."""
    bars: list[Progress] = []
    make = getattr(module, name)

    def recording(console: Console) -> Progress:
        bars.append(make(console))
        return bars[-1]

    monkeypatch.setattr(module, name, recording)
    return bars


def test_attack_bar_ends_at_the_step_it_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bars = _record_bars(monkeypatch, gradleak.cli.attack, "psnr_bar")
    assert main(["attack", "--device", "cpu", "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "metrics.json").read_text())
    assert row["converged"] and row["iterations"] < 300  # stopped early
    (task,) = bars[0].tasks
    assert task.completed == task.total == row["iterations"]
    assert task.fields["loss"] == f"{row['matching_loss']:.2e}"


def test_attack_text_bar_shows_the_final_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bars = _record_bars(monkeypatch, gradleak.cli.text)
    assert main(["attack-text", "--device", "cpu", "--out", str(tmp_path)]) == 0
    row = json.loads((tmp_path / "metrics.json").read_text())
    (task,) = bars[0].tasks
    assert task.fields["loss"] == f"{row['matching_loss']:.2e}"
    assert task.completed == task.total == row["iterations"]


def test_finish_loss_bar_text() -> None:
    console = Console(record=True, width=120, force_terminal=False)
    progress = loss_bar(console)
    task = progress.add_task("idlg attack", total=300, loss="")
    progress.update(task, completed=31, loss="4.10e+00")
    finish_loss_bar(progress, task, 30, 5e-13)
    console.print(progress.get_renderable())
    text = console.export_text()
    assert "30/30" in text and "loss 5.00e-13" in text and "300" not in text
    finish_loss_bar(progress, task, 30, None)
    assert progress.tasks[0].fields["loss"] == "diverged"
