"""`gradleak audit`: a captured run's clients rebuilt, bad captures refused one line each.

The captures come from the demo's Flower apps driven in this process
(`InProcessGrid`: no Ray), on the built-in MNIST samples unless a test needs
the real MNIST test split.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("flwr", reason='the Flower tests need pip install "gradleak[flower]"')

from safetensors.numpy import load, save  # noqa: E402

from gradleak.cli import main  # noqa: E402
from gradleak.errors import AttackNotApplicable  # noqa: E402
from gradleak.experiments.audit.choose import ScaleFreeIDLG, choose_attack  # noqa: E402
from gradleak.experiments.audit.load import plan_items  # noqa: E402
from gradleak.experiments.audit.report import KEYS  # noqa: E402
from gradleak.experiments.flower_demo.apps import make_client_app, serve  # noqa: E402
from gradleak.experiments.flower_demo.local import InProcessGrid  # noqa: E402
from gradleak.experiments.flower_demo.settings import DemoRun  # noqa: E402
from gradleak.integrations.reader import Exchange, Stored  # noqa: E402
from gradleak.models import build_model  # noqa: E402
from gradleak.threat import observe, observe_update  # noqa: E402


def capture(out: Path, **options: Any) -> Path:
    """Run the demo's server and clients in this process; return the capture folder."""
    settings = {"clients": 2, "rounds": 1, "dataset": "sample", "out": str(out)} | options
    run = DemoRun(**settings)
    serve(InProcessGrid(make_client_app(run), run.clients), run)
    return run.captures


def cli(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as done:
        return int(done.code)


def entries(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "leakage.json").read_text())


@pytest.fixture(scope="module")
def sample_capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return capture(tmp_path_factory.mktemp("capture") / "run", rounds=2)


def test_the_audit_of_a_one_step_mnist_run_rebuilds_every_client(
    data_root: Path, tmp_path: Path
) -> None:
    captures = capture(tmp_path / "run", clients=4, dataset="mnist", data_dir=str(data_root))
    out = tmp_path / "audit"
    assert cli("audit", str(captures), "--out", str(out), "--workers", "1") == 0
    found = entries(out)
    assert len(found) == 4
    for entry in found:
        assert set(KEYS) <= set(entry)
        assert entry["method"] == "idlg" and entry["shared"] == "gradient"
        assert entry["true_labels"] == entry["predicted_labels"] and entry["label_accuracy"] == 1.0
        assert entry["mse"] < 1e-3, entry
        assert entry["update_cosine"] > 0.999999
        assert (out / entry["strip"]).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert report.startswith("# What this Flower run leaked to its server\n\n- **Round 1**: 4 of 4")
    assert "What would have prevented it" in report.split("## Per round")[0]


def test_a_rerun_resumes_and_adds_nothing(sample_capture: Path, tmp_path: Path) -> None:
    out = tmp_path / "audit"
    assert cli("audit", str(sample_capture), "--out", str(out), "--workers", "1") == 0
    first = (out / "results.jsonl").read_text()
    assert len(first.splitlines()) == 4  # 2 clients x 2 rounds
    assert cli("audit", str(sample_capture), "--out", str(out), "--workers", "1") == 0
    assert (out / "results.jsonl").read_text() == first
    assert cli("audit", str(sample_capture), "--out", str(out), "--method", "ig") == 2


def sidecars(folder: Path) -> list[Path]:
    return sorted(folder.glob("round-0001/node-*.json"))


def damage_reply(folder: Path, how: str) -> str:
    """Damage the first node's reply of round 1 in one of the ways the issue names."""
    sidecar = sidecars(folder)[0]
    content = json.loads(sidecar.read_text())
    reply = folder / content["reply"]["file"]
    data = bytearray(reply.read_bytes())
    if how == "tampered":
        data[-1] ^= 0x01  # one byte of one weight
        reply.write_bytes(bytes(data))
        return "does not match its sha256"
    if how == "truncated":
        reply.write_bytes(bytes(data[: len(data) // 2]))
        return "does not match its sha256"
    if how == "outside":
        (folder.parent / "elsewhere.safetensors").write_bytes(bytes(data))
        content["reply"]["file"] = "../elsewhere.safetensors"
        sidecar.write_text(json.dumps(content))
        return "points outside the capture folder"
    if how == "misfit":
        arrays = load(bytes(data))
        arrays["arrays/fc.weight"] = arrays["arrays/fc.weight"][:, :-1].copy()
        blob = save(arrays)
        reply.write_bytes(blob)
        import hashlib

        content["reply"]["sha256"] = hashlib.sha256(blob).hexdigest()
        sidecar.write_text(json.dumps(content))
        return "the arrays do not fit the model"
    if how == "missing":
        reply.unlink()
        return "missing from the capture folder"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["tampered", "truncated", "outside", "misfit", "missing"])
def test_a_bad_capture_is_one_line_and_the_rest_is_audited(
    sample_capture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    folder = tmp_path / "captures"
    shutil.copytree(sample_capture, folder)
    bad_node = json.loads(sidecars(folder)[0].read_text())["node_id"]
    expected = damage_reply(folder, how)
    out = tmp_path / "audit"
    capsys.readouterr()
    assert cli("audit", str(folder), "--out", str(out), "--workers", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gradleak: error: ") and expected in err[0], err
    assert "Traceback" not in "".join(err)
    found = {(e["round"], e["node_id"]): e for e in entries(out)}
    assert len(found) == 4
    refused = found[(1, bad_node)]
    assert refused["error"] and refused["mse"] is None and refused["method"] is None
    audited = [e for key, e in found.items() if key != (1, bad_node)]
    assert all(e["error"] is None and e["mse"] < 1e-3 for e in audited)
    assert expected in (out / "report.md").read_text()


def test_a_capture_folder_without_capture_json_is_one_line(tmp_path: Path, capsys) -> None:
    assert cli("audit", str(tmp_path), "--out", str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no capture.json" in err[0]


def exchange(round_: int, node: int, digest: str) -> Exchange:
    stored = Stored("x", digest, {})
    return Exchange(
        round_, node, f"round-{round_:04d}/node-{node}.json", stored, {}, stored, {}, 1, None
    )


def test_identical_replies_of_a_round_are_one_aggregate_target() -> None:
    a, b = "a" * 64, "b" * 64
    items, notes = plan_items(
        [
            exchange(1, 5, a),
            exchange(1, 6, a),
            exchange(1, 7, a),
            exchange(2, 5, a),
            exchange(2, 6, b),
        ]
    )
    assert [(i.key, i.node_ids) for i in items] == [
        ("round-0001/aggregate", (5, 6, 7)),
        ("round-0002/node-5", (5,)),
        ("round-0002/node-6", (6,)),
    ]
    assert notes == []


def test_the_chooser_picks_by_schedule_model_and_clipping() -> None:
    model = build_model("lenet", input_shape=(1, 28, 28), num_classes=10, seed=0)
    x, y = torch.rand(1, 1, 28, 28), torch.tensor([3])
    gradient = observe(model, x, y)
    update = observe_update(model, x, y, local_lr=0.01, local_steps=4, seed=0)
    assert choose_attack(gradient).method == "idlg"
    assert choose_attack(update).method == "ig"
    assert choose_attack(gradient, clipped=True).method == "idlg-rescaled"
    convnet = build_model("convnet", input_shape=(1, 28, 28), num_classes=10, seed=0, width=2)
    assert choose_attack(observe(convnet, x, y)).method == "ig"
    assert choose_attack(gradient, method="ig").method == "ig"
    with pytest.raises(AttackNotApplicable, match="4 local steps"):
        choose_attack(update, method="idlg")


def test_the_scale_free_idlg_undoes_clipping(data_root: Path) -> None:
    """A clipped gradient is s * g: the closed form reads the image, the scale follows."""
    from dataclasses import replace

    from gradleak.data import load_dataset

    image, label = load_dataset("mnist", data_dir=data_root)[7]
    model = build_model("lenet", input_shape=(1, 28, 28), num_classes=10, seed=1)
    seen = observe(model, image[None], torch.tensor([label]))
    clipped = replace(seen, gradients=tuple(0.37 * g for g in seen.gradients))
    attack = choose_attack(clipped, clipped=True).attack
    assert isinstance(attack, ScaleFreeIDLG)
    assert attack.scale(clipped) == pytest.approx(0.37, rel=1e-4)
    result = attack(clipped, seed=0)
    assert int(result.labels[0]) == label
    assert float(((result.inputs.float() - image) ** 2).mean()) < 1e-6


def test_a_scalar_that_comes_back_as_one_element_still_fits_the_model() -> None:
    # Flower's reply holds BatchNorm's num_batches_tracked (a 0-d tensor) as shape (1,);
    # the audit of a ConvNet demo refused every reply for it.  Any other shape is refused.
    from gradleak.errors import DataError
    from gradleak.experiments.audit.load import _fit

    model = build_model("convnet", input_shape=(3, 32, 32), num_classes=10, width=4, seed=0)
    arrays = {name: t.numpy()[None] if t.dim() == 0 else t.numpy()
              for name, t in model.state_dict().items()}  # fmt: skip
    counter = next(name for name in arrays if name.endswith("num_batches_tracked"))
    fitted = _fit(model, {"arrays": arrays}, "reply")
    assert fitted[counter].shape == () and fitted[counter].dtype == torch.long
    model.load_state_dict(fitted, strict=True)
    arrays[counter] = arrays[counter].repeat(2)
    with pytest.raises(DataError, match="has shape"):
        _fit(model, {"arrays": arrays}, "reply")
