"""The demo's Flower apps: honest clients, a FedAvg server wrapped in LeakageAudit.

Clients (Flower's Message API, `ClientApp` with ``@app.train()``): each round a
client loads the global arrays it was sent into the model, draws its private
batch (`private_batch`: B images of its partition of the seeded test split,
fresh each round), trains with plain SGD for the K local steps the server
configured, each on the whole batch, in train mode, and replies with its
weights and ``num-examples``.  Only in the demo it also saves that batch
under ``captures/private/`` so that the report can score itself; the server
never reads it.

Server: Flower's FedAvg (every client, every round), optionally inside
Flower's DP wrappers, inside `LeakageAudit` (outermost).  Flower's privacy
options:

* ``server-fixed``: `DifferentialPrivacyServerSideFixedClipping` clips each
  update on the server and noises the aggregate;
* ``client-fixed``: `DifferentialPrivacyClientSideFixedClipping` sends the
  clipping norm, the clients' `fixedclipping_mod` clips, the server noises
  the aggregate;
* ``local``: the clients' `LocalDpMod` clips and adds Gaussian noise before
  sending (sensitivity = clipping norm);
* ``--secagg``: SecAgg+ (`SecAggPlusWorkflow`, `secaggplus_mod`) on Flower's
  legacy stack, the only one that has it; the legacy client (`NumPyClient`)
  trains exactly as the Message-API one, and `LegacyLeakageAudit` records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from torch import nn

from gradleak.attacks.imprint import dishonest_attack, plan_to_json
from gradleak.data import ImageDataset
from gradleak.experiments.common import cached_dataset
from gradleak.experiments.flower_demo.settings import PUBLIC_IMAGES, DemoRun
from gradleak.integrations.capture import PRIVATE_FOLDER, ModelInfo
from gradleak.integrations.flower import LeakageAudit, LegacyLeakageAudit, ModelGuard
from gradleak.models import build_model

OnRound = Callable[[int], None]


# --- the clients --------------------------------------------------------------------------


def private_batch(
    data: ImageDataset, run: DemoRun, partition: int, partitions: int, server_round: int
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """A client's private batch of a round: B images of its partition, drawn afresh each round.

    The test split is permuted once (``run.seed``) and dealt into `partitions`
    parts; partition p draws B distinct images of its part with
    ``SeedSequence([seed, p, round])``.
    """
    order = np.random.default_rng(run.seed).permutation(len(data))
    part = order[partition::partitions]
    if len(part) < run.batch_size:
        raise ValueError(
            f"partition {partition} has {len(part)} images, fewer than B={run.batch_size}"
        )
    rng = np.random.default_rng(np.random.SeedSequence([run.seed, partition, server_round]))
    indices = [int(part[i]) for i in rng.choice(len(part), run.batch_size, replace=False)]
    pairs = [data[i] for i in indices]
    return indices, torch.stack([x for x, _ in pairs]), torch.tensor([int(y) for _, y in pairs])


def local_train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float, steps: int
) -> float:
    """Plain SGD, `steps` steps on the whole batch, in train mode; returns the last loss."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loss = torch.zeros(())
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def demo_model(run: DemoRun, data: ImageDataset) -> nn.Module:
    return build_model(
        run.model,
        input_shape=data.shape,
        num_classes=data.num_classes,
        seed=run.seed,
        width=run.width,
    )


def model_info(run: DemoRun, data: ImageDataset) -> ModelInfo:
    return ModelInfo(
        run.model, data.shape, data.num_classes, demo_model(run, data).gradleak_spec.width
    )


def _client_round(
    run: DemoRun, context: Context, state: dict[str, torch.Tensor], config: Any
) -> tuple[nn.Module, int, float]:
    """What every demo client does with the weights and config it got."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Ray gives each client one CPU
    try:
        return _train_round(run, context, state, config)
    finally:
        torch.set_num_threads(threads)  # as it was: an in-process grid shares this process


def _train_round(
    run: DemoRun, context: Context, state: dict[str, torch.Tensor], config: Any
) -> tuple[nn.Module, int, float]:
    data = cached_dataset(run.dataset, run.data_dir)
    model = demo_model(run, data)
    model.load_state_dict(state, strict=True)
    server_round = int(config["server-round"])
    partition = int(context.node_config["partition-id"])
    partitions = int(context.node_config["num-partitions"])
    indices, x, y = private_batch(data, run, partition, partitions, server_round)
    loss = local_train(model, x, y, lr=float(config["lr"]), steps=int(config["local-steps"]))
    _save_private(run, server_round, context.node_id, partition, indices, x, y)
    return model, len(y), loss


def _save_private(
    run: DemoRun, server_round: int, node_id: int, partition: int, indices: list[int],
    x: torch.Tensor, y: torch.Tensor,
) -> None:  # fmt: skip
    """The demo's ground truth, next to the captures (never sent, never read by the server)."""
    from safetensors.torch import save_file

    folder = run.captures / PRIVATE_FOLDER / f"round-{server_round:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"partition": str(partition), "indices": ",".join(map(str, indices))}
    save_file(
        {"images": x.contiguous(), "labels": y},
        str(folder / f"node-{node_id}.safetensors"),
        metadata,
    )


def make_client_app(run: DemoRun) -> ClientApp:
    """The Message-API client, with Flower's client-side DP mod when the run asks for one."""
    from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod

    mods: list[Any] = [ModelGuard()] if run.guard else []
    if run.flower_dp == "client-fixed":
        mods += [fixedclipping_mod]
    elif run.flower_dp == "local":
        clip = run.dp_clipping_norm
        mods += [LocalDpMod(clip, sensitivity=clip, epsilon=run.dp_epsilon, delta=run.dp_delta)]
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        state = msg.content["arrays"].to_torch_state_dict()
        model, count, loss = _client_round(run, context, state, msg.content["config"])
        reply = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"num-examples": count, "train-loss": loss}),
            }
        )
        return Message(content=reply, reply_to=msg)

    return app


def make_legacy_client_app(run: DemoRun) -> ClientApp:
    """The legacy client (a NumPyClient) behind `secaggplus_mod`: SecAgg+ masks its reply."""
    from flwr.client.mod import secaggplus_mod

    def client_fn(context: Context) -> Any:
        return _LegacyClient(run, context).to_client()

    guard = [ModelGuard()] if run.guard else []
    return ClientApp(client_fn=client_fn, mods=[*guard, secaggplus_mod])


class _LegacyClient(NumPyClient):
    def __init__(self, run: DemoRun, context: Context) -> None:
        self.run, self.context = run, context

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list, int, dict]:
        data = cached_dataset(self.run.dataset, self.run.data_dir)
        names = list(demo_model(self.run, data).state_dict())
        state = {n: torch.from_numpy(np.array(p)) for n, p in zip(names, parameters, strict=True)}
        model, count, loss = _client_round(self.run, self.context, state, config)
        arrays = [t.detach().cpu().numpy() for t in model.state_dict().values()]
        return arrays, count, {"train-loss": loss}


# --- the server ---------------------------------------------------------------------------


# The dishonest server's own images of the domain, from which it sets the bins: the last ones
# of the test split (clients may hold some of them too; the bins need only the domain's
# statistics, not the clients' images).


def crafted_weights(run: DemoRun, data: ImageDataset) -> tuple[nn.Module, dict[str, Any]]:
    """The demo's dishonest server: the seeded model with the weights `dishonest_attack` crafts
    for it (binning, or the output layer's rows; convolutions below set to pass the input
    through), and the plan as the capture's header keeps it (JSON).

    Raises:
        AttackNotApplicable: The model has no layer the attack can use (one line saying why).
    """
    model = demo_model(run, data)
    start = max(0, len(data) - PUBLIC_IMAGES)
    public = torch.stack([data[i][0] for i in range(start, len(data))])
    crafted, plan = dishonest_attack(model).craft(model, public)
    return crafted, plan_to_json(plan)


class CraftedWeights(Strategy):
    """A dishonest server's strategy: the wrapped one, but every round it sends `crafted`."""

    def __init__(self, strategy: Strategy, crafted: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.strategy, self.crafted = strategy, crafted

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Any:  # fmt: skip
        return self.strategy.configure_train(server_round, ArrayRecord(self.crafted), config, grid)

    def aggregate_train(self, server_round: int, replies: Any) -> Any:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Any:  # fmt: skip
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Any) -> Any:
        return self.strategy.aggregate_evaluate(server_round, replies)


def build_strategy(
    run: DemoRun,
    info: ModelInfo,
    on_round: OnRound | None = None,
    crafted: tuple[nn.Module, dict[str, Any]] | None = None,
) -> LeakageAudit:
    """FedAvg over every client, in Flower's DP wrapper if asked, in LeakageAudit (outermost)."""
    strategy: Strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=run.clients,
        min_available_nodes=run.clients,
    )
    dp = (run.dp_noise_multiplier, run.dp_clipping_norm, run.clients)
    if run.flower_dp == "server-fixed":
        strategy = DifferentialPrivacyServerSideFixedClipping(strategy, *dp)
    elif run.flower_dp == "client-fixed":
        strategy = DifferentialPrivacyClientSideFixedClipping(strategy, *dp)
    plan = None
    if crafted is not None:
        strategy = CraftedWeights(strategy, crafted[0].state_dict())
        plan = crafted[1]
    return LeakageAudit(strategy, out=run.captures, model=info, on_round=on_round, malicious=plan)


def serve(grid: Grid, run: DemoRun, on_round: OnRound | None = None) -> Any:
    """The ServerApp's work: the wrapped FedAvg for `run.rounds` rounds from the seeded model."""
    data = cached_dataset(run.dataset, run.data_dir)
    model = demo_model(run, data)
    crafted = crafted_weights(run, data) if run.malicious != "none" else None
    strategy = build_strategy(run, model_info(run, data), on_round, crafted)
    return strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=run.rounds,
        train_config=ConfigRecord(run.train_config()),
    )


def serve_legacy(
    grid: Grid, context: Context, run: DemoRun, on_round: OnRound | None = None
) -> None:
    """SecAgg+ on the legacy stack: legacy FedAvg in LegacyLeakageAudit, in SecAggPlusWorkflow."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    data = cached_dataset(run.dataset, run.data_dir)
    model = demo_model(run, data)
    plan = None
    if run.malicious != "none":
        model, plan = crafted_weights(run, data)
    arrays = [t.detach().cpu().numpy() for t in model.state_dict().values()]
    strategy = LegacyFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=run.clients,
        min_evaluate_clients=0,
        min_available_clients=run.clients,
        on_fit_config_fn=lambda server_round: {**run.train_config(), "server-round": server_round},
        initial_parameters=ndarrays_to_parameters(arrays),
    )
    if plan is not None:
        strategy = _CraftedLegacy(strategy, ndarrays_to_parameters(arrays))
    audit = LegacyLeakageAudit(
        strategy, out=run.captures, model=model_info(run, data), on_round=on_round,
        malicious=plan,
    )  # fmt: skip
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=run.rounds), strategy=audit
    )
    # Fractions: every client holds a share of every key and all are needed (works from 2
    # clients).  max_weight is the largest example count a client can have, B: Flower's default
    # (1,000) scales a one-image update down 1,000-fold before quantising it, which buries it.
    secagg = SecAggPlusWorkflow(
        num_shares=1.0, reconstruction_threshold=1.0, max_weight=float(run.batch_size)
    )
    workflow = DefaultWorkflow(fit_workflow=secagg)
    workflow(grid, legacy)


class _CraftedLegacy:
    """The dishonest server on the legacy stack: every round it sends `parameters`."""

    def __init__(self, strategy: Any, parameters: Any) -> None:
        self.strategy, self.parameters = strategy, parameters

    def __getattr__(self, name: str) -> Any:
        return getattr(self.strategy, name)

    def initialize_parameters(self, client_manager: Any) -> Any:
        return self.parameters

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        return self.strategy.configure_fit(server_round, self.parameters, client_manager)


def make_server_app(run: DemoRun, on_round: OnRound | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if run.secagg:
            serve_legacy(grid, context, run, on_round)
        else:
            serve(grid, run, on_round)

    return app


def make_apps(run: DemoRun, on_round: OnRound | None = None) -> tuple[ServerApp, ClientApp]:
    client = make_legacy_client_app(run) if run.secagg else make_client_app(run)
    return make_server_app(run, on_round), client
