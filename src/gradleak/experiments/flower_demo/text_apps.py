"""The Flower apps of `gradleak flower-demo --task text`: federated LoRA fine-tuning, captured.

Client (Message API): gets the global adapters and the round's config, loads
them into the seeded decoder (`text_task.py`), draws its batch of private
sentences for the round, takes K plain SGD steps of next-token loss on it and
replies with its adapters and ``num-examples``: only the adapters travel, as
in FlowerTune.  Only in the demo it also saves that batch as JSON under
``captures/private/`` so that the audit can score itself; the server never
reads it.

Server: Flower's FedAvg (every client, every round) inside `LeakageAudit`,
which records the adapters sent and returned and, in the capture's header,
the `TextModelSpec` the audit rebuilds the model from.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from gradleak.experiments.flower_demo.settings import DemoRun
from gradleak.experiments.flower_demo.text_task import (
    TextModelSpec,
    adapter_state,
    base_model,
    client_sentences,
    load_adapters,
    local_train_text,
    lora_model,
    round_batch,
    save_private_sentences,
)
from gradleak.experiments.text.batch import shipped_sentences
from gradleak.integrations.flower import LeakageAudit

OnRound = Any  # Callable[[int], None] | None


def train_text_round(
    run: DemoRun, spec: TextModelSpec, context: Context, state: dict[str, Any], config: Any
) -> tuple[dict[str, torch.Tensor], int, float]:
    """What every text client does with the adapters and config it got."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Ray gives each client one CPU
    try:
        lm = base_model(spec)
        model = lora_model(spec, lm)
        load_adapters(model, state, "the adapters the server sent")
        server_round = int(config["server-round"])
        partition = int(context.node_config["partition-id"])
        partitions = int(context.node_config["num-partitions"])
        held = client_sentences(
            shipped_sentences(), seed=run.seed, partition=partition, partitions=partitions,
            per_client=run.sentences_per_client,
        )  # fmt: skip
        batch = round_batch(
            held, seed=run.seed, partition=partition, server_round=server_round,
            batch_size=int(config["batch-size"]),
        )  # fmt: skip
        model.train()
        loss = local_train_text(
            model, lm, batch, lr=float(config["lr"]), steps=int(config["local-steps"])
        )
        save_private_sentences(run.captures, server_round, context.node_id, partition, batch)
        return adapter_state(model), len(batch), loss
    finally:
        torch.set_num_threads(threads)


def make_text_client_app(run: DemoRun, spec: TextModelSpec) -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        state = {n: a.numpy() for n, a in msg.content["arrays"].items()}
        adapters, count, loss = train_text_round(run, spec, context, state, msg.content["config"])
        reply = RecordDict(
            {
                "arrays": ArrayRecord(adapters),
                "metrics": MetricRecord({"num-examples": count, "train-loss": loss}),
            }
        )
        return Message(content=reply, reply_to=msg)

    return app


def build_text_strategy(run: DemoRun, spec: TextModelSpec, on_round: OnRound = None
                        ) -> LeakageAudit:  # fmt: skip
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=run.clients,
        min_available_nodes=run.clients,
    )
    return LeakageAudit(strategy, out=run.captures, on_round=on_round, text_model=spec.to_json())


def serve_text(grid: Grid, run: DemoRun, spec: TextModelSpec, on_round: OnRound = None) -> Any:
    """The ServerApp's work: FedAvg of the adapters for `run.rounds` rounds from fresh ones."""
    initial = adapter_state(lora_model(spec))
    strategy = build_text_strategy(run, spec, on_round)
    return strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=run.rounds,
        train_config=ConfigRecord(run.train_config()),
    )


def make_text_apps(run: DemoRun, spec: TextModelSpec, on_round: OnRound = None
                   ) -> tuple[ServerApp, ClientApp]:  # fmt: skip
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        serve_text(grid, run, spec, on_round)

    return server, make_text_client_app(run, spec)
