"""Run a Flower app folder (the user's own, untouched) on Flower's simulation engine.

`flwr run` runs an app from its folder; on one machine it starts a SuperLink
and SuperExec that outlive the command.  `simulate_app` does what Flower's
``flower-simulation --app DIR`` does instead, in this process: the ServerApp
and ClientApp are loaded from the folder's ``[tool.flwr.app.components]``,
and each side's ``context.run_config`` is the folder's
``[tool.flwr.app.config]`` with `override` on top, exactly as the app would
see it under `flwr run`.  Flower's Python API for this is internal
(``flwr.simulation.run_simulation._run_simulation``), tested with flwr 1.42.

`write_truth_from_metrics` stores, for a simulation whose data you hold,
each node's training examples beside the capture (found from a metric the
app reports, such as its partition id), so that the audit scores itself.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gradleak.errors import ConfigError
from gradleak.integrations.capture import write_ground_truth
from gradleak.integrations.reader import read_capture, read_exchanges


def simulate_app(
    app_dir: str | os.PathLike[str],
    *,
    clients: int,
    override: Mapping[str, Any] | None = None,
    cpus: int = 2,
    state_dir: str | os.PathLike[str],
) -> float:
    """Run the app in `app_dir` with `clients` simulated nodes; returns the seconds it took.

    Raises:
        ConfigError: The folder is not a Flower app, or the simulation failed.
    """
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    from gradleak.experiments.audit.app import read_run_config

    app = Path(app_dir).resolve()
    read_run_config(app)  # one line if it is not a Flower app
    components = _components(app)
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        {
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_HOME": str(state / ".flwr"),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        }
    )
    if str(app) not in sys.path:
        sys.path.insert(0, str(app))
    overrides = dict(override or {})
    run = Run.create_empty(run_id=int.from_bytes(os.urandom(7), "big"))
    run.primary_task_id = 1
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = overrides
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    config = get_fused_config_from_dir(app, overrides)
    context = Context(
        run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=config
    )
    started = time.perf_counter()
    result = _run_simulation(
        num_supernodes=clients,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app_attr=components["clientapp"],
        server_app_attr=components["serverapp"],
        server_app_context=context,
        app_dir=str(app),
        run=run,
        is_app=True,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": cpus,
                "num_gpus": 0,
                "include_dashboard": False,
                "logging_level": "ERROR",
                "log_to_driver": False,
            },
        },  # fmt: skip
    )
    if result is None or getattr(result, "context", None) is None:
        raise ConfigError(f"the Flower simulation of {app} failed; run it with flwr run to see why")
    return time.perf_counter() - started


def _components(app: Path) -> dict[str, str]:
    from gradleak.experiments.audit.app import tomllib

    data = tomllib.loads((app / "pyproject.toml").read_text(encoding="utf-8"))
    found = data.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    if not {"serverapp", "clientapp"} <= set(found):
        raise ConfigError(f"{app}/pyproject.toml names no [tool.flwr.app.components]")
    return {k: str(v) for k, v in found.items()}


def write_truth_from_metrics(
    captures: str | os.PathLike[str],
    metric: str,
    examples: Callable[[int], tuple[Any, Any]],
) -> int:
    """Store every node's examples of every round, found by a metric its reply carries.

    Args:
        captures: The capture folder.
        metric: The reply metric that names the node's data (e.g. "partition-id").
        examples: ``examples(value) -> (images, labels)``: the examples the node
            with that metric value trained on, in pixel space.

    Returns:
        How many node-rounds were stored.

    Raises:
        ConfigError: A reply without the metric.
    """
    capture = read_capture(captures)
    exchanges, _ = read_exchanges(capture)
    stored = 0
    for exchange in exchanges:
        if exchange.reply is None:
            continue
        value = next((r[metric] for r in exchange.metrics.values() if metric in r), None)
        if value is None:
            raise ConfigError(f"{exchange.sidecar}: the reply has no metric '{metric}'")
        images, labels = examples(int(value))
        write_ground_truth(captures, exchange.round, exchange.node_id, images, labels)
        stored += 1
    return stored
