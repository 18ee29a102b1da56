"""The sweep runner: one store, one lock, executors that never change the rows.

The reference for every executor is the in-process run: worker processes,
Ray, a resumed run and a run whose worker was killed must give its rows bit
for bit (timing fields aside).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gradleak.errors import ConfigError, DataError
from gradleak.sweep.executors import InProcess, Processes, make_executor
from gradleak.sweep.runner import Group, SweepIncomplete, run_sweep
from gradleak.sweep.store import FolderLock, ResultsStore, pin_run, read_results

TIMING = {"seconds"}
HAS_RAY = importlib.util.find_spec("ray") is not None


def key(row: dict[str, Any]) -> tuple[int, int]:
    return int(row["group"]), int(row["item"])


def toy_task(context: dict[str, Any], spec: tuple[int, int], emit: Any) -> None:
    """A task of the plan: `count` rows for group `group`, each with a file."""
    group, count = spec
    for item in range(count):
        if context.get("fail_at") == (group, item):
            os._exit(3)  # a worker that dies mid-group
        time.sleep(context.get("pause", 0.0))
        payload = {"group": group, "item": item, "value": (group * 1000 + item) ** 2}
        emit(payload, {f"files/{group}-{item}.txt": str(payload["value"]).encode()})


def toy_plan(groups: int, per_group: int) -> list[Group]:
    return [Group(tuple((g, i) for i in range(per_group)), (g, per_group)) for g in range(groups)]


def file_lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# --------------------------------------------------------------------------
# The store


def test_store_appends_dedupes_and_resumes(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "results.jsonl", key=key)
    assert store.add({"group": 0, "item": 0, "value": 1})
    assert not store.add({"group": 0, "item": 0, "value": 2})  # the same key: not written
    assert store.add({"group": 0, "item": 1, "value": 3})
    again = ResultsStore(tmp_path / "results.jsonl", key=key)
    assert [r["value"] for r in again.rows] == [1, 3]
    assert (0, 1) in again and (1, 0) not in again
    assert len(file_lines(tmp_path / "results.jsonl")) == 2


def test_store_drops_a_truncated_last_line_and_refuses_an_edited_one(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text('{"group": 0, "item": 0}\n{"group": 0, "it')
    store = ResultsStore(path, key=key)
    assert len(store.rows) == 1
    assert path.read_text() == '{"group": 0, "item": 0}\n'  # cut back to the last full line
    store.add({"group": 0, "item": 1})
    assert [key(r) for r in file_lines(path)] == [(0, 0), (0, 1)]
    path.write_text('{"group": 0, "item": 0}\nnot json\n{"group": 0, "item": 1}\n')
    with pytest.raises(DataError, match="line 2"):
        read_results(path, key=key)


def test_changed_settings_are_refused(tmp_path: Path) -> None:
    params = {"paper": "idlg", "dataset": "mnist", "mode": "faithful", "seed": 0}
    pin_run(tmp_path, params)
    pin_run(tmp_path, {**params, "command": "another spelling"})  # not pinned: fine
    with pytest.raises(ConfigError, match="seed 0 -> 1"):
        pin_run(tmp_path, {**params, "seed": 1})
    with pytest.raises(ConfigError, match="iterations"):
        pin_run(tmp_path, {**params, "iterations": 5}, pinned=("iterations",))


def test_a_second_run_into_a_locked_folder_is_one_line_and_exit_2(
    data_root: Path, tmp_path: Path
) -> None:
    with FolderLock(tmp_path):
        with pytest.raises(
            ConfigError, match=f"in use by another gradleak run \\(process {os.getpid()}\\)"
        ):
            FolderLock(tmp_path).__enter__()
        done = subprocess.run(
            [sys.executable, "-m", "gradleak.cli", "reproduce", "idlg", "--dataset", "mnist",
             "--data-dir", str(data_root), "--experiments", "1", "--out", str(tmp_path)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"process {os.getpid()}" in lines[0], done.stderr
    with FolderLock(tmp_path):  # released: the next run gets in
        pass


# --------------------------------------------------------------------------
# Executors on a toy plan


def run_toy(tmp_path: Path, executor: Any, context: dict[str, Any] | None = None) -> ResultsStore:
    store = ResultsStore(tmp_path / "results.jsonl", key=key)
    with executor:
        run_sweep(store, toy_plan(5, 7), toy_task, context or {}, executor)
    return store


def test_worker_processes_interleave_results_without_loss(tmp_path: Path) -> None:
    reference = run_toy(tmp_path / "one", InProcess())
    store = run_toy(tmp_path / "three", Processes(3), {"pause": 0.01})
    rows = file_lines(tmp_path / "three" / "results.jsonl")
    assert sorted(key(r) for r in rows) == sorted((g, i) for g in range(5) for i in range(7))
    assert sorted(rows, key=key) == sorted(reference.rows, key=key)
    assert len(store.rows) == 35
    # Each row's file was written before its line, by the one writing process.
    for row in rows:
        text = (tmp_path / "three" / "files" / f"{row['group']}-{row['item']}.txt").read_text()
        assert text == str(row["value"])


def test_a_dead_worker_is_reported_and_its_items_done_by_the_rerun(tmp_path: Path) -> None:
    with pytest.raises(SweepIncomplete, match="died \\(exit code 3\\).*rerun the same command"):
        run_toy(tmp_path, Processes(2), {"fail_at": (2, 3)})
    first = file_lines(tmp_path / "results.jsonl")
    assert (2, 3) not in {key(r) for r in first}
    run_toy(tmp_path, Processes(2))
    rows = file_lines(tmp_path / "results.jsonl")
    assert sorted(key(r) for r in rows) == sorted((g, i) for g in range(5) for i in range(7))


def test_a_group_cut_short_is_rerun_whole_and_written_once(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "results.jsonl", key=key)
    store.add({"group": 1, "item": 0, "value": 1_000_000})  # as an interrupted run left it
    calls: list[tuple[int, int]] = []

    def task(context: Any, spec: tuple[int, int], emit: Any) -> None:
        calls.append(spec)
        toy_task(context, spec, emit)

    run_sweep(store, toy_plan(2, 3), task, {}, InProcess())
    assert calls == [(0, 3), (1, 3)]  # group 1 ran again, whole
    rows = file_lines(tmp_path / "results.jsonl")
    assert sorted(key(r) for r in rows) == [(g, i) for g in range(2) for i in range(3)]
    run_sweep(store, toy_plan(2, 3), task, {}, InProcess())
    assert len(calls) == 2  # nothing left to do


def test_workers_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="--workers must be 1 or more"):
        make_executor(0)


# --------------------------------------------------------------------------
# Real sweeps through the CLI


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradleak.cli", *args], capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def reproduce_args(data_root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "reproduce", "idlg", "--dataset", "mnist", "--data-dir", str(data_root),
        "--experiments", "6", "--chunk", "2", "--out", str(out), *extra,
    ]  # fmt: skip


def rows_by_key(out: Path) -> dict[tuple[int, str], dict[str, Any]]:
    rows = file_lines(out / "results.jsonl")
    keys = [(r["experiment"], r["method"]) for r in rows]
    assert len(keys) == len(set(keys)), "an item was written twice"
    return {(r["experiment"], r["method"]): {k: r[k] for k in r.keys() - TIMING} for r in rows}


@pytest.fixture(scope="module")
def one_worker_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "one"
    done = cli(*reproduce_args(data_root, out, "--workers", "1"))
    assert done.returncode == 0, done.stderr
    return out


def test_two_workers_give_the_rows_of_one(
    one_worker_run: Path, data_root: Path, tmp_path: Path
) -> None:
    done = cli(*reproduce_args(data_root, tmp_path, "--workers", "2"))
    assert done.returncode == 0, done.stderr
    reference = rows_by_key(one_worker_run)
    assert set(reference) == {(e, m) for e in range(6) for m in ("dlg", "idlg")}
    assert rows_by_key(tmp_path) == reference  # bit for bit: every MSE, label and step count
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["executor"] == "2 worker processes"


def worker_pids(parent: int) -> list[int]:
    """The parent's multiprocessing workers (not its resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"spawn_main" in command:
            found.append(int(entry.name))
    return found


def test_a_killed_worker_loses_only_its_group_and_the_rerun_matches(
    one_worker_run: Path, data_root: Path, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "gradleak.cli",
               *reproduce_args(data_root, tmp_path, "--workers", "2")]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = tmp_path / "results.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 1 and worker_pids(proc.pid):
            break
        time.sleep(0.05)
    victims = worker_pids(proc.pid)
    assert victims, "no worker process found"
    os.kill(victims[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("the run ended before the worker could be killed")
    assert proc.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "died (signal SIGKILL)" in lines[0], stderr
    assert "rerun the same command" in lines[0]
    done = cli(*reproduce_args(data_root, tmp_path, "--workers", "2"))
    assert done.returncode == 0, done.stderr
    assert rows_by_key(tmp_path) == rows_by_key(one_worker_run)


@pytest.mark.skipif(not HAS_RAY, reason='Ray is not installed: pip install "gradleak[ray]"')
def test_ray_local_gives_the_rows_of_one_process(
    one_worker_run: Path, data_root: Path, tmp_path: Path
) -> None:
    done = cli(*reproduce_args(data_root, tmp_path, "--ray", "local", "--workers", "2"))
    assert done.returncode == 0, done.stderr
    assert rows_by_key(tmp_path) == rows_by_key(one_worker_run)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["executor"] == "Ray (local)"


def test_bad_executor_input_is_one_line_and_exit_2(data_root: Path, tmp_path: Path) -> None:
    checks = {
        "--workers 0": ["--workers", "0"],
        "--ray on a dead address": ["--ray", "127.0.0.1:9"],
        "--ray without a port": ["--ray", "somewhere"],
        "--out a file": ["--out", str(tmp_path / "a-file")],
        "--out inside a file": ["--out", str(tmp_path / "a-file" / "run")],
    }
    (tmp_path / "a-file").write_text("not a folder")
    for what, extra in checks.items():
        start = time.monotonic()
        done = cli(*reproduce_args(data_root, tmp_path / what.replace(" ", "_"), *extra))
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (what, done.stderr)
        assert lines[0].startswith("gradleak: error: ")
        if "dead" in what:
            assert "no Ray cluster answers at 127.0.0.1:9" in lines[0] or not HAS_RAY, lines[0]
            assert time.monotonic() - start < 30


def test_ray_without_the_extra_names_it(data_root: Path, tmp_path: Path) -> None:
    fake = tmp_path / "no-ray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('ray is not installed')\n")
    path = os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])
    args = reproduce_args(data_root, tmp_path / "o", "--ray", "local")
    done = subprocess.run(
        [sys.executable, "-m", "gradleak.cli", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": path},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        'gradleak: error: --ray needs the Ray extra: pip install -c constraints.txt "gradleak[ray]"'
    )
