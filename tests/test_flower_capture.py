"""LeakageAudit, the curious server's wrapper: what it records, and that it changes nothing.

Flower's `Strategy.start` is driven here by `InProcessGrid` (the demo's own
ClientApp, called in this process), so no Ray is started: seconds, not a
simulation's half minute.  The clients use the built-in MNIST samples.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason='the Flower tests need pip install "gradleak[flower]"')

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord  # noqa: E402
from flwr.serverapp.strategy import (  # noqa: E402
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from safetensors.numpy import load_file  # noqa: E402

from gradleak.data import load_dataset  # noqa: E402
from gradleak.errors import ConfigError  # noqa: E402
from gradleak.experiments.flower_demo.apps import demo_model, make_client_app, model_info  # noqa: E402
from gradleak.experiments.flower_demo.local import InProcessGrid  # noqa: E402
from gradleak.experiments.flower_demo.settings import DemoRun  # noqa: E402
from gradleak.integrations.flower import LeakageAudit  # noqa: E402
from gradleak.integrations.reader import read_capture, read_exchanges  # noqa: E402
from gradleak.threat import client_gradients  # noqa: E402

CLIENTS = 2


def demo(tmp_path: Path, **options: Any) -> DemoRun:
    return DemoRun(
        clients=CLIENTS, rounds=2, dataset="sample", out=str(tmp_path / "run"), **options
    )


def start(run: DemoRun, strategy: Strategy) -> Any:
    data = load_dataset(run.dataset)
    grid = InProcessGrid(make_client_app(run), run.clients)
    return strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(demo_model(run, data).state_dict()),
        num_rounds=run.rounds,
        train_config=ConfigRecord(run.train_config()),
    )


def fedavg() -> FedAvg:
    return FedAvg(fraction_evaluate=0.0, min_train_nodes=CLIENTS, min_available_nodes=CLIENTS)


def audited(run: DemoRun, inner: Strategy) -> LeakageAudit:
    return LeakageAudit(inner, out=run.captures, model=model_info(run, load_dataset(run.dataset)))


def test_a_captured_one_step_update_is_minus_lr_times_the_clients_gradient(tmp_path: Path) -> None:
    run = demo(tmp_path)
    start(run, audited(run, fedavg()))
    capture = read_capture(run.captures)
    exchanges, problems = read_exchanges(capture)
    assert problems == [] and len(exchanges) == CLIENTS * run.rounds
    data = load_dataset(run.dataset)
    for exchange in exchanges:
        assert exchange.config["config"]["lr"] == run.lr
        assert exchange.config["config"]["server-round"] == exchange.round
        assert exchange.num_examples == 1 and exchange.error is None
        sent = load_file(str(capture.folder / exchange.sent.file))
        returned = load_file(str(capture.folder / exchange.reply.file))
        private = load_file(
            str(
                capture.folder
                / f"private/round-{exchange.round:04d}/node-{exchange.node_id}.safetensors"
            )
        )
        model = demo_model(run, data)
        model.load_state_dict({k[len("arrays/") :]: torch.from_numpy(v) for k, v in sent.items()})
        x, y = torch.from_numpy(private["images"]), torch.from_numpy(private["labels"])
        gradients = client_gradients(model, x, y)
        names = [name for name, _ in model.named_parameters()]
        for name, gradient in zip(names, gradients, strict=True):
            update = returned[f"arrays/{name}"].astype(np.float64) - sent[f"arrays/{name}"]
            difference = np.abs(update + run.lr * gradient.double().numpy()).max()
            assert difference <= 1e-6, (exchange.sidecar, name, difference)


def test_the_wrapped_strategy_ends_with_the_same_global_model_bit_for_bit(tmp_path: Path) -> None:
    plain = start(demo(tmp_path / "plain"), fedavg())
    run = demo(tmp_path / "wrapped")
    wrapped = start(run, audited(run, fedavg()))
    initial = demo_model(run, load_dataset(run.dataset)).state_dict()
    assert list(plain.arrays) == list(wrapped.arrays) == list(initial)
    for name in initial:
        a, b = plain.arrays[name].numpy(), wrapped.arrays[name].numpy()
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name
    # The rounds did move the model, so equality says something.
    assert any(plain.arrays[n].numpy().tobytes() != initial[n].numpy().tobytes() for n in initial)


class Recorder(Strategy):
    """A strategy that hands out known objects, to see the wrapper pass them on untouched."""

    def __init__(self) -> None:
        self.replies: list[Message] | None = None
        self.messages: list[Message] = []
        self.result = (ArrayRecord(), MetricRecord({"seen": 1}))

    def configure_train(self, server_round, arrays, config, grid):  # noqa: ANN001, ANN201
        self.messages = list(fedavg().configure_train(server_round, arrays, config, grid))
        return self.messages

    def aggregate_train(self, server_round, replies):  # noqa: ANN001, ANN201
        self.replies = list(replies)
        return self.result

    def configure_evaluate(self, server_round, arrays, config, grid):  # noqa: ANN001, ANN201
        return []

    def aggregate_evaluate(self, server_round, replies):  # noqa: ANN001, ANN201
        return None

    def summary(self) -> None:
        pass


def test_the_wrapper_passes_the_same_message_objects_both_ways(tmp_path: Path) -> None:
    run = demo(tmp_path)
    inner = Recorder()
    wrapper = audited(run, inner)
    grid = InProcessGrid(make_client_app(run), CLIENTS)
    arrays = ArrayRecord(demo_model(run, load_dataset("sample")).state_dict())
    messages = list(wrapper.configure_train(1, arrays, ConfigRecord(run.train_config()), grid))
    assert [id(m) for m in messages] == [id(m) for m in inner.messages]
    replies = grid.send_and_receive(messages)
    assert wrapper.aggregate_train(1, replies) is inner.result
    assert [id(r) for r in inner.replies] == [id(r) for r in replies]


def test_replies_are_recorded_before_server_side_dp_clips_them(tmp_path: Path) -> None:
    """Server-side clipping rewrites replies in place; outermost, the capture sees them raw."""
    run = demo(tmp_path)
    clip = 1e-3  # far below a one-step update's norm (about 0.2 at lr 0.01)
    inner = DifferentialPrivacyServerSideFixedClipping(fedavg(), 0.0, clip, CLIENTS)
    start(run, audited(run, inner))
    capture = read_capture(run.captures)
    exchanges, _ = read_exchanges(capture)
    for exchange in exchanges:
        sent = load_file(str(capture.folder / exchange.sent.file))
        returned = load_file(str(capture.folder / exchange.reply.file))
        norm = np.sqrt(
            sum(float(((returned[k] - sent[k]).astype(np.float64) ** 2).sum()) for k in sent)
        )
        assert norm > 100 * clip, (exchange.sidecar, norm)


def test_a_capture_is_safetensors_and_json_with_checksums(tmp_path: Path) -> None:
    run = demo(tmp_path)
    start(run, audited(run, fedavg()))
    files = [p for p in run.captures.rglob("*") if p.is_file()]
    assert files and {p.suffix for p in files} == {".json", ".safetensors"}
    for sidecar in run.captures.glob("round-*/node-*.json"):
        content = json.loads(sidecar.read_text())
        for part in (content["sent"], content["reply"]):
            data = (run.captures / part["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == part["sha256"]
    # FedAvg sends one content to every node: stored once per round.
    assert len(list(run.captures.glob("round-0001/sent-*.safetensors"))) == 1


def test_a_folder_holding_a_capture_is_refused(tmp_path: Path) -> None:
    run = demo(tmp_path)
    audited(run, fedavg())
    with pytest.raises(ConfigError, match="holds a capture already"):
        audited(run, fedavg())


def test_importing_gradleak_does_not_import_flower_or_ray() -> None:
    code = "import sys, gradleak, gradleak.cli; print(sorted({'flwr', 'ray'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_flower_demo_without_the_extra_is_one_line_and_exit_2(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['flwr'] = None\n"  # import flwr now raises ImportError
        "from gradleak.cli import main\n"
        f"sys.exit(main(['flower-demo', '--dataset', 'sample', '--out', {str(tmp_path)!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        'gradleak: error: the Flower commands need the flower extra: pip install "gradleak[flower]"'
    ]


def test_the_legacy_wrapper_records_secure_aggregation_as_one_aggregate(tmp_path: Path) -> None:
    """Under SecAgg+ the legacy strategy is handed N replies that all carry the aggregate."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.strategy import FedAvg as LegacyFedAvg

    from gradleak.experiments.audit.load import plan_items
    from gradleak.integrations.flower import LegacyLeakageAudit

    run = demo(tmp_path)
    model = demo_model(run, load_dataset(run.dataset))
    arrays = [t.numpy() for t in model.state_dict().values()]
    manager = SimpleClientManager()
    for node in (11, 22):
        manager.register(GridClientProxy(node, None, 1))  # type: ignore[arg-type]

    def legacy() -> LegacyFedAvg:
        return LegacyFedAvg(
            fraction_fit=1.0, min_fit_clients=2, min_available_clients=2,
            on_fit_config_fn=lambda r: {**run.train_config(), "server-round": r},
        )  # fmt: skip

    wrapper = LegacyLeakageAudit(
        legacy(), out=run.captures, model=model_info(run, load_dataset("sample"))
    )
    instructions = wrapper.configure_fit(1, ndarrays_to_parameters(arrays), manager)
    aggregate = ndarrays_to_parameters([a + 0.5 for a in arrays])  # what SecAgg+ hands on
    results = [
        (proxy, FitRes(Status(Code.OK, ""), aggregate, 1, {"train-loss": 1.0}))
        for proxy, _ in instructions
    ]
    wrapped, _ = wrapper.aggregate_fit(1, results, [])
    plain, _ = legacy().aggregate_fit(1, results, [])
    for a, b in zip(parameters_to_ndarrays(wrapped), parameters_to_ndarrays(plain), strict=True):
        assert a.tobytes() == b.tobytes()
    exchanges, problems = read_exchanges(read_capture(run.captures))
    assert problems == [] and sorted(e.node_id for e in exchanges) == [11, 22]
    assert all(e.config["config"]["lr"] == run.lr and e.num_examples == 1 for e in exchanges)
    items, _ = plan_items(exchanges)
    assert [(i.key, i.node_ids) for i in items] == [("round-0001/aggregate", (11, 22))]
