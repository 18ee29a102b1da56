"""`gradleak flower-demo --task text`: federated LoRA fine-tuning on Flower, its sentences rebuilt.

One real simulation (2 clients, 3 rounds of the default text settings on
gpt2-tiny) in a subprocess, as a user types it, then `gradleak audit` on its
capture from the files on disk; and the one-line refusals of bad settings.
About 40 s, most of it Ray starting and its workers importing torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason='the Flower tests need pip install "gradleak[flower]"')
pytest.importorskip("peft", reason="the text task needs peft")


def _gradleak(*args: str) -> subprocess.CompletedProcess[str]:
    # `python -m gradleak.cli`: the package this test imports (a worktree's, via PYTHONPATH).
    command = [sys.executable, "-m", "gradleak.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_text_demo_rebuilds_the_clients_sentences_from_their_adapters(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    done = _gradleak("flower-demo", "--task", "text", "--clients", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    result = json.loads((out / "text-leakage.json").read_text())
    entries = result["entries"]
    # 2 Flower nodes x 3 rounds, each with the sentence it saved as ground truth.
    assert len(entries) == 6 and len({e["node_id"] for e in entries}) == 2
    assert sorted({e["round"] for e in entries}) == [1, 2, 3]
    assert all(e["error"] is None and len(e["truth"]) == 1 for e in entries)
    # Only adapters travel: the capture's arrays are LoRA's A and B, nothing of the base model.
    sent = json.loads(next((out / "captures" / "round-0001").glob("node-*.json")).read_text())
    names = sent["sent"]["records"]["arrays"]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    # Round 1 starts from fresh adapters (B = 0), which the audit notes.
    assert all(e["b_sent_zero"] for e in entries if e["round"] == 1)
    # Once the adapters are trained, every client's sentence comes back exactly.
    last = [e for e in entries if e["round"] == 3]
    assert all(e["exact"] == 1.0 for e in last), [e["recovered"] for e in last]
    assert all(e["sentences"][0]["recovered"] == e["sentences"][0]["original"] for e in last)
    exact = sum(e["exact_count"] for e in entries) / len(entries)
    assert exact >= 0.8
    report = (out / "report.md").read_text()
    assert report.startswith("# What the server rebuilt from the clients' LoRA updates")
    assert "round 3: 2 of 2 private sentences rebuilt exactly" in report
    # `gradleak audit` finds the text model in the capture's header and reaches the same rows.
    again = _gradleak("audit", str(out / "captures"), "--out", str(tmp_path / "audit"))
    assert again.returncode == 0, again.stderr[-2000:]
    audited = json.loads((tmp_path / "audit" / "text-leakage.json").read_text())["entries"]
    assert [e.get("exact") for e in audited] == [e.get("exact") for e in entries]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--task", "sound"), "--task must be one of image, text, got 'sound'"),
        (("--task", "text", "--lora-rank", "65"), "--lora-rank must be between 1 and the model"),
        (("--task", "text", "--model", "bert-tiny"), "is not a built-in GPT-2-shaped decoder"),
        (("--task", "text", "--model", "llama-tiny"), "choose one of gpt2-tiny, gpt2-small"),
        (("--task", "text", "--clients", "17"), "17 clients x 4 sentences need 68"),
    ],
)
def test_bad_text_demo_settings_are_one_line_and_exit_2(
    tmp_path: Path, args: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from gradleak.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["flower-demo", *args, "--out", str(tmp_path / "demo")])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradleak: error: ") and message in lines[0]
    assert not (tmp_path / "demo" / "captures").exists()


def test_text_audit_reads_a_capture_without_ground_truth_and_refuses_a_changed_file(
    tmp_path: Path,
) -> None:
    """In process (InProcessGrid, no Ray): the audit from the files alone, no sentences saved
    beside them; a reply changed after the capture is refused for that client only."""
    import shutil

    import torch

    from gradleak.experiments.audit.text import run_text_audit
    from gradleak.experiments.flower_demo.local import InProcessGrid
    from gradleak.experiments.flower_demo.settings import DemoRun
    from gradleak.experiments.flower_demo.text_apps import make_text_client_app, serve_text
    from gradleak.experiments.text.batch import shipped_sentences

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = DemoRun(task="text", model="gpt2-tiny", clients=2, rounds=2, lr=0.5,
                      local_steps=3, batch_size=1, out=str(tmp_path / "demo"))  # fmt: skip
        spec = run.text_spec()
        serve_text(InProcessGrid(make_text_client_app(run, spec), run.clients), run, spec)
        shutil.rmtree(run.captures / "private")  # a capture of someone else's clients
        reply = sorted((run.captures / "round-0002").glob("reply-*.safetensors"))[0]
        data = bytearray(reply.read_bytes())
        data[-1] ^= 1
        reply.write_bytes(bytes(data))
        result = run_text_audit(run.captures, tmp_path / "audit")
    finally:
        torch.set_num_threads(threads)
    entries = result.summary["entries"]
    assert len(entries) == 4 and all(e["truth"] is None for e in entries)
    changed = [e for e in entries if e["error"]]
    assert len(changed) == 1 and "sha256" in changed[0]["error"] and changed[0]["round"] == 2
    # The others' sentences come back, each one of the shipped sentences, as the client's.
    shipped = {s.lower() for s in shipped_sentences()}
    rebuilt = [t for e in entries if not e["error"] for t in e["recovered"]]
    assert len(rebuilt) == 3 and all(t in shipped for t in rebuilt)
    report = (tmp_path / "audit" / "report.md").read_text()
    assert "no ground truth beside the capture" in report and "sha256" in report
