"""A dishonest server's crafted weights (binning) and the client's guard against them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradleak.attacks.imprint import Binning, OutputRows, dishonest_attack, with_imprint
from gradleak.data import load_dataset
from gradleak.errors import AttackNotApplicable
from gradleak.integrations.guard import inspect_weights
from gradleak.models import build_model
from gradleak.threat import observe, observe_aggregate, observe_update
from gradleak.types import Observation

APP = Path(__file__).parent / "apps" / "quickstart"


@pytest.fixture(scope="module")
def mnist(data_root: Path):
    return load_dataset("mnist", data_dir=data_root)


def batch(data, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([data[i][0] for i in range(start, start + count)])
    return x, torch.tensor([data.label(i) for i in range(start, start + count)])


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 10))


def exact(recovered: torch.Tensor, originals: torch.Tensor) -> int:
    """Originals that some reconstruction matches to MSE below 1e-4."""
    errors = ((recovered[:, None] - originals[None]) ** 2).flatten(2).mean(-1)
    return int((errors.min(0).values < 1e-4).sum())


def test_binning_reads_most_of_a_batch_of_64_back_exactly(mnist) -> None:
    public, _ = batch(mnist, 9000, 1000)  # the server's own images of the domain
    crafted, plan = Binning().craft(mlp(), public)
    x, y = batch(mnist, 0, 64)
    recovered = Binning().decode(observe(crafted, x, y), plan).inputs
    # About (1 - 1/1024)^63 = 94% alone in a bin if the bins were of equal mass for this
    # batch; measured 57 of 64.
    assert exact(recovered, x) >= 32
    # Without the error equaliser (the next layer's columns alike) the rows' errors differ
    # and the differences of neighbouring rows no longer cancel.
    unequal, plan = Binning().craft(mlp(), public)
    with torch.no_grad():
        unequal[3].weight.copy_(mlp(1)[3].weight)
    assert exact(Binning().decode(observe(unequal, x, y), plan).inputs, x) <= 2


def test_binning_reads_a_fedavg_update_of_several_steps(mnist) -> None:
    # 4 local steps on mini-batches of 16: each example enters the trap rows once per step it
    # is in, with its own error each time; a bin alone still gives its example back, as the
    # weights barely move (lr 0.01).  Measured 53 of 64.
    public, _ = batch(mnist, 9000, 1000)
    crafted, plan = Binning().craft(mlp(), public)
    x, y = batch(mnist, 0, 64)
    update = observe_update(crafted, x, y, local_lr=0.01, local_steps=4, local_batch=16, seed=0)
    read = Observation(update.model, tuple(-u for u in update.update), update.parameter_names,
                       update.input_shape, update.num_classes, 64)  # fmt: skip
    assert exact(Binning().decode(read, plan).inputs, x) >= 32


def test_binning_works_through_secure_aggregation(mnist) -> None:
    public, _ = batch(mnist, 9000, 1000)
    crafted, plan = Binning().craft(mlp(), public)
    clients = [batch(mnist, 100 + 16 * c, 16) for c in range(8)]
    recovered = Binning().decode(observe_aggregate(crafted, clients), plan).inputs
    everyone = torch.cat([x for x, _ in clients])
    assert exact(recovered, everyone) >= int(0.4 * 128)  # measured 97 of 128


def quickstart_net() -> nn.Module:
    sys.path.insert(0, str(APP))
    try:
        from qsapp.task import Net
    finally:
        sys.path.remove(str(APP))
    torch.manual_seed(0)
    return Net()


def exact_against(recovered: torch.Tensor, reduced: torch.Tensor) -> int:
    return exact(recovered.double(), reduced.double())


def test_pass_through_on_the_quickstart_net_reads_block_maxima_exactly(data_root: Path) -> None:
    cifar = load_dataset("cifar100", data_dir=data_root)
    public, _ = batch(cifar, 700, 200)
    crafted, plan = Binning().craft(quickstart_net(), public)
    assert plan.front is not None and plan.front.resolution.startswith("7x7 per colour of 4x4")
    x, y = batch(cifar, 0, 8)
    y = y % 10  # the Net has 10 outputs
    # The reduction the plan states, computed independently: 4 x 4 maxima of the centre 28 x 28.
    reduced = plan.front.reduce(x)
    blocks = torch.nn.functional.max_pool2d(x[:, :, 2:30, 2:30].double(), 4)
    assert torch.allclose(reduced[:, :, 2:30:4, 2:30:4], blocks)
    recovered = Binning().decode(observe(crafted, x, y), plan).inputs
    assert exact_against(recovered, reduced) >= 5  # measured 6 of 8 (two share a bin)
    # Broken crafting: the second convolution no longer copies; nothing comes back exactly.
    with torch.no_grad():
        crafted.conv2.weight.add_(0.05 * torch.randn(crafted.conv2.weight.shape))
    broken = Binning().decode(observe(crafted, x, y), plan).inputs
    assert exact_against(broken, reduced) == 0


def test_pass_through_on_lenet_inverts_the_sigmoids_and_reads_the_output_layer(mnist) -> None:
    public, _ = batch(mnist, 9000, 300)
    model = build_model("lenet", input_shape=(1, 28, 28), num_classes=10, seed=0)
    attack = dishonest_attack(model)
    assert isinstance(attack, OutputRows)  # one Linear layer: no binning
    crafted, plan = attack.craft(model, public)
    assert plan.front.resolution == "14x14 per colour of 2x2 block means"
    x, y = batch(mnist, 0, 8)
    reduced = plan.front.reduce(x)
    means = torch.nn.functional.avg_pool2d(x.double(), 2)
    assert torch.allclose(reduced, means.repeat_interleave(2, 2).repeat_interleave(2, 3))
    result = attack.decode(observe(crafted, x, y), plan)
    errors = ((result.inputs.double()[:, None] - reduced[None]) ** 2).flatten(2).mean(-1)
    alone = [i for i in range(8) if int((y == y[i]).sum()) == 1]  # alone in their class
    assert len(alone) >= 3
    for i in alone:  # each comes back exactly, under its own label
        j = int(errors[:, i].argmin())
        assert float(errors[j, i]) < 1e-4 and int(result.labels[j]) == int(y[i])
    with torch.no_grad():
        crafted.body[2].weight.mul_(1.1)  # the second layer's scale no longer what was planned
    assert exact_against(attack.decode(observe(crafted, x, y), plan).inputs, reduced) == 0


def test_pass_through_on_the_convnet_is_exact_in_eval_mode_and_affine_in_train_mode(
    mnist,
) -> None:
    public, _ = batch(mnist, 9000, 200)
    model = build_model("convnet", input_shape=(1, 28, 28), num_classes=10, seed=0, width=4)
    crafted, plan = OutputRows().craft(model, public)
    assert plan.front.resolution.startswith("3x3 per colour of 9x9 block maxima")
    x, y = batch(mnist, 0, 8)
    reduced = plan.front.reduce(x)
    assert torch.allclose(
        reduced[:, :, 0:27:9, 0:27:9], F.max_pool2d(x[:, :, :27, :27], 9).double()
    )
    alone = sum(int((y == v).sum()) == 1 for v in y)
    evaluated = OutputRows().decode(observe(crafted, x, y, batchnorm="eval"), plan).inputs
    assert exact_against(evaluated, reduced) == alone
    # Train mode: BatchNorm standardises with the batch's statistics, an affine map per
    # channel the server does not know; its estimate from public images is close, not exact.
    trained = OutputRows().decode(observe(crafted, x, y, batchnorm="train"), plan).inputs
    assert exact_against(trained, reduced) == 0
    errors = ((trained.double()[:, None] - reduced[None]) ** 2).flatten(2).mean(-1)
    assert int((errors.min(0).values < 0.02).sum()) >= alone


def test_layers_the_pass_through_cannot_set_are_one_line() -> None:
    class Centred(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.more = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 14 * 14, 10)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            h = torch.relu(self.more(h) - h.mean(dim=(2, 3), keepdim=True))  # no weights to set
            return self.fc(F.max_pool2d(h, 2).flatten(1))

    with pytest.raises(AttackNotApplicable, match="do not pass the input through"):
        OutputRows().craft(Centred(), torch.rand(32, 1, 28, 28))
    model = build_model("convnet", input_shape=(1, 28, 28), num_classes=10, seed=0, width=4)
    with pytest.raises(AttackNotApplicable, match="binning needs two Linear layers"):
        Binning().craft(model, torch.rand(8, 1, 28, 28))


def test_the_guard_is_quiet_on_honest_models_and_their_training(mnist) -> None:
    for name, shape in [("lenet", (1, 28, 28)), ("convnet", (1, 28, 28)),
                        ("resnet20", (3, 32, 32)), ("resnet18", (3, 32, 32))]:  # fmt: skip
        model = build_model(name, input_shape=shape, num_classes=10, seed=0)
        assert inspect_weights(model.state_dict()) == [], name
    model = mlp()
    x, y = batch(mnist, 0, 32)
    previous = None
    for round_ in range(3):  # FedAvg rounds of one client, the guard checking each
        state = {k: v.clone() for k, v in model.state_dict().items()}
        assert inspect_weights(state, previous) == [], round_
        update = observe_update(model, x, y, local_lr=0.1, epochs=1, local_batch=8, seed=round_)
        model.load_state_dict(update.returned)
        previous = state
    assert inspect_weights(quickstart_net().state_dict()) == []


def test_the_guard_catches_crafted_weights_and_the_evasions_it_knows(mnist) -> None:
    public, _ = batch(mnist, 9000, 1000)
    crafted, _ = Binning().craft(mlp(), public)
    reasons = inspect_weights(crafted.state_dict())
    assert any("rows repeat" in r for r in reasons)
    assert any("in order" in r for r in reasons)
    # Evasion: units shuffled (the server knows the order) and noise on the rows.
    generator = torch.Generator().manual_seed(1)
    state = {k: v.clone() for k, v in crafted.state_dict().items()}
    order = torch.randperm(1024, generator=generator)
    state["1.weight"] = state["1.weight"][order] + 1e-4 * torch.randn(
        1024, 784, generator=generator
    )
    state["1.bias"] = state["1.bias"][order]
    state["3.weight"] = state["3.weight"] + 1e-4 * torch.randn(10, 1024, generator=generator)
    assert any("point the same way" in r for r in inspect_weights(state))
    # A few bins hidden among the honest model's own rows.
    few = {k: v.clone() for k, v in mlp().state_dict().items()}
    few["1.weight"][:16] = crafted.state_dict()["1.weight"][:16]
    few["1.bias"][:16] = crafted.state_dict()["1.bias"][:16]
    assert any("16 of its rows point the same way" in r for r in inspect_weights(few))
    # A jump out of proportion with learning, and weights that are not numbers.
    honest = mlp().state_dict()
    moved = {k: v * 5 for k, v in honest.items()}
    assert any("moved" in r for r in inspect_weights(moved, honest))
    broken = dict(honest) | {"3.bias": torch.full((10,), float("nan"))}
    assert any("NaN" in r for r in inspect_weights(broken))
    kernels = {"conv.weight": torch.zeros(16, 3, 5, 5)}
    kernels["conv.weight"][:, :, 2, 2] = 1.0
    assert any("single input pixel" in r for r in inspect_weights(kernels))


def test_model_guard_refuses_crafted_weights_in_a_flower_client(mnist) -> None:
    pytest.importorskip("flwr", reason='needs pip install "gradleak[flower]"')
    from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from gradleak.experiments.flower_demo.local import InProcessGrid
    from gradleak.integrations.flower import ModelGuard

    app = ClientApp(mods=[ModelGuard()])

    @app.train()
    def train(msg, context):
        model = mlp()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = batch(mnist, 0, 8)
        update = observe_update(model, x, y, local_lr=0.1, local_steps=1, seed=0)
        content = RecordDict(
            {"arrays": ArrayRecord(update.returned), "metrics": MetricRecord({"num-examples": 8})}
        )
        return msg.__class__(content=content, reply_to=msg)

    grid = InProcessGrid(app, 2)

    def send(state: dict) -> list:
        content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord({"lr": 0.1})})
        messages = [
            grid.create_message(content, MessageType.TRAIN, node, "1")
            for node in grid.get_node_ids()
        ]
        return list(grid.send_and_receive(messages))

    honest = send(mlp().state_dict())
    assert not any(reply.has_error() for reply in honest)
    public, _ = batch(mnist, 9000, 1000)
    crafted, _ = Binning().craft(mlp(), public)
    refused = send(crafted.state_dict())
    assert all(reply.has_error() for reply in refused)
    assert "ModelGuard refused" in refused[0].error.reason


@pytest.mark.parametrize("guard", [False, True])
def test_the_malicious_demo_reads_clients_back_unless_they_guard(
    data_root: Path, tmp_path: Path, guard: bool
) -> None:
    pytest.importorskip("flwr", reason='needs pip install "gradleak[flower]"')
    from gradleak.experiments.audit.run import AuditRun, run_audit
    from gradleak.experiments.flower_demo.apps import make_client_app, serve
    from gradleak.experiments.flower_demo.local import InProcessGrid
    from gradleak.experiments.flower_demo.settings import DemoRun
    from gradleak.integrations.reader import read_capture

    run = DemoRun(
        clients=2, rounds=1, dataset="mnist", model="mlp", batch_size=32, data_dir=str(data_root),
        out=str(tmp_path / "run"), malicious="trap", guard=guard,
    )  # fmt: skip
    serve(InProcessGrid(make_client_app(run), run.clients), run)
    assert read_capture(run.captures).malicious["attack"] == "binning"  # the header says so
    result = run_audit(AuditRun(captures=str(run.captures), out=str(tmp_path / "audit"),
                                workers=1))  # fmt: skip
    report = (tmp_path / "audit" / "report.md").read_text()
    assert "A DISHONEST SERVER" in report
    if guard:
        assert result.summary["entries"] == []
        assert sum("ModelGuard refused" in note for note in result.summary["notes"]) == 2
        assert "2 client replies refused by ModelGuard" in report
    else:
        rebuilt = sum(e["images_rebuilt"] for e in result.summary["entries"])
        assert rebuilt >= 32, rebuilt  # of 64


def test_attack_threat_reads_a_batch_back_and_refuses_a_model_without_a_trap(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from gradleak.cli import main

    out = tmp_path / "threat"
    code = main(["attack", "--threat", "trap", "--model", "mlp", "--dataset", "mnist",
                 "--data-dir", str(data_root), "--batch-size", "16", "--clients", "4",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    row = json.loads((out / "metrics.json").read_text())
    assert row["images"] == 64 and row["exact"] >= 32 and row["clients"] == 4
    assert (out / "reconstruction.png").is_file()
    with pytest.raises(SystemExit) as exit_:
        main(["attack", "--threat", "trap", "--model", "resnet20", "--dataset", "mnist",
              "--data-dir", str(data_root), "--out", str(tmp_path / "x")])  # fmt: skip
    assert exit_.value.code == 2 and "pass-through" in capsys.readouterr().err


def test_the_imprint_block_reads_examples_back_at_full_resolution(mnist) -> None:
    # Robbing the Fed's second mode: the server ships an imprint block in front of LeNet.
    model = with_imprint(
        build_model("lenet", input_shape=(1, 28, 28), num_classes=10, seed=0), (1, 28, 28), 256
    )
    public, _ = batch(mnist, 9000, 500)
    attack = dishonest_attack(model)
    crafted, plan = attack.craft(model, public)
    assert plan.layer == "0.imprint" and plan.front is None
    x, y = batch(mnist, 0, 16)
    recovered = attack.decode(observe(crafted, x, y), plan).inputs
    assert exact(recovered, x) >= 10  # measured 14 of 16; (1 - 1/256)^15 = 94% if equal mass
    # Without the equaliser (the block's second layer random again) nothing comes back exactly.
    with torch.no_grad():
        crafted[0].mix.weight.normal_(generator=torch.Generator().manual_seed(3))
    assert exact(attack.decode(observe(crafted, x, y), plan).inputs, x) <= 1


def test_the_guard_refuses_pass_through_weights_even_with_noise_on_unused_channels(mnist) -> None:
    public, _ = batch(mnist, 9000, 200)
    model = build_model("convnet", input_shape=(1, 28, 28), num_classes=10, seed=0, width=4)
    crafted, _ = OutputRows().craft(model, public)
    assert any("kernels are all zero" in r for r in inspect_weights(crafted.state_dict()))
    # The server fills the kernels of the channels it does not use with noise: no zero kernels
    # left, but the channels that carry the input still read a single weight each.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for conv in (m for m in crafted.modules() if isinstance(m, nn.Conv2d)):
            unused = conv.weight.flatten(1).abs().sum(1) == 0
            conv.weight[unused] = 0.01 * torch.randn(conv.weight[unused].shape, generator=generator)
    reasons = inspect_weights(crafted.state_dict())
    assert not any("all zero" in r for r in reasons)
    assert any("read almost nothing" in r for r in reasons)


def test_the_malicious_demo_passes_lenets_input_through_and_refuses_a_tampered_plan(
    data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # LeNet has one Linear layer: the server zeroes it (output rows) and sets the strided
    # convolutions to carry 2x2 block means up to it; the audit rebuilds the decoder from the
    # header's JSON plan and the weights the capture recorded.
    pytest.importorskip("flwr", reason='needs pip install "gradleak[flower]"')
    import json

    from gradleak.cli import main
    from gradleak.experiments.audit.run import AuditRun, run_audit
    from gradleak.experiments.flower_demo.apps import make_client_app, serve
    from gradleak.experiments.flower_demo.local import InProcessGrid
    from gradleak.experiments.flower_demo.settings import DemoRun
    from gradleak.integrations.capture import CAPTURE_FILE

    run = DemoRun(
        clients=2, rounds=1, dataset="mnist", model="lenet", batch_size=4, data_dir=str(data_root),
        out=str(tmp_path / "run"), malicious="trap",
    )  # fmt: skip
    serve(InProcessGrid(make_client_app(run), run.clients), run)
    header_file = run.captures / CAPTURE_FILE
    header = json.loads(header_file.read_text())
    plan = header["malicious"]
    assert plan["attack"] == "output-rows" and plan["front"]["kind"] == "strided"
    audit = tmp_path / "audit"
    result = run_audit(AuditRun(captures=str(run.captures), out=str(audit), workers=1))
    entries = result.summary["entries"]
    assert len(entries) == 2 and all(e["resolution"].startswith("14x14") for e in entries)
    # Exact against the originals reduced to 2x2 block means: every image alone in its class
    # in its client's batch, and no other (measured: 4 of [0, 1, 2, 7], 0 of [1, 1, 8, 8]).
    for e in entries:
        alone = sum(1 for c in e["true_labels"] if e["true_labels"].count(c) == 1)
        assert e["images_rebuilt"] == alone, e
    assert sum(e["images_rebuilt"] for e in entries) >= 4
    assert "at 14x14 per colour of 2x2 block means" in (audit / "report.md").read_text()
    assert all((audit / e["strip"]).is_file() for e in entries)
    # A plan changed in the header (another trap layer, binning on LeNet's one Linear layer,
    # a front or a resolution the weights do not make): one line, exit 2, before any attack.
    capsys.readouterr()  # Flower's own log of the run above
    for change in (
        {"layer": "body.0"},
        {"attack": "binning", "thresholds": [0.1, 0.2]},
        {"front": plan["front"] | {"kind": "pooled"}},
        {"front": plan["front"] | {"resolution": "28x28 per colour of 1x1 block pixels"}},
    ):
        header_file.write_text(json.dumps(header | {"malicious": plan | change}))
        with pytest.raises(SystemExit) as exit_:
            main(["audit", str(run.captures), "--out", str(tmp_path / "tampered")])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
        assert "plan in the capture's header does not fit" in err, err
