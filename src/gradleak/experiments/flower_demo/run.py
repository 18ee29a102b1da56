"""`gradleak flower-demo`: a real Flower simulation, captured by LeakageAudit, then audited.

1. Checks everything it can before starting Flower: the extra, the data, the
   model, the output folder.
2. Runs Flower's simulation engine (`flwr.simulation.run_simulation`, which
   runs the clients as Ray actors) offline: telemetry and update checks off,
   Flower's home under ``OUT/.flwr``, Ray's temporary folder ``OUT/.ray``
   (through a short link in the system's temp folder when that path is too
   long for Ray's Unix sockets), Ray limited to `DemoRun.cpus` CPUs, one per
   client.  The server's strategy is FedAvg in LeakageAudit (apps.py); the
   captures go to ``OUT/captures/``, with the clients' private batches.
3. Writes ``OUT/captures/demo.json`` (the settings, the simulation's time)
   once the simulation has finished, then runs `gradleak audit` on the
   captures into OUT.

A rerun with the same settings finds demo.json, skips the simulation and
resumes the audit; other settings, or captures without demo.json (a
simulation that was cut short), are refused in one line.

``--task text`` runs the same simulation path with the text apps
(`text_apps.py`: federated LoRA fine-tuning of a built-in decoder, the
clients' sentences saved as JSON ground truth), then the text audit
(`experiments/audit/text.py`), which reads only the capture on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gradleak.errors import ConfigError
from gradleak.experiments.audit.report import DEMO_SETTINGS
from gradleak.experiments.audit.run import AuditResult, AuditRun, run_audit
from gradleak.experiments.audit.text import TextAuditResult, run_text_audit
from gradleak.experiments.common import absolute_data_dir, cached_dataset
from gradleak.experiments.flower_demo.settings import PUBLIC_IMAGES, DemoRun
from gradleak.integrations import missing_flower
from gradleak.integrations.capture import ModelInfo
from gradleak.outdir import prepare_out
from gradleak.sweep.executors import cpu_count

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, float, int], None]
# Ray puts Unix sockets under its temp folder ("<temp>/session_<date>_<pid>/sockets/...",
# about 65 more characters); Linux allows 107 in a socket path.
RAY_TEMP_MAX = 40


@dataclass(frozen=True)
class DemoResult:
    """What the command prints: the simulation's time and the audit (the text audit's for
    ``--task text``)."""

    simulation_seconds: float
    simulated: bool
    audit: AuditResult | TextAuditResult


def run_flower_demo(run: DemoRun, *, callback: ProgressCallback | None = None) -> DemoResult:
    """Simulate, capture and audit; see the module docstring.

    Raises:
        ConfigError: No Flower extra, bad settings, or an output folder holding another run.
        DataError: The dataset's files are missing or corrupt.
    """
    out = prepare_out(run.out).resolve()
    if not _installed("flwr"):
        raise missing_flower()
    if run.task == "text":
        return _text_demo(replace(run, out=str(out)), out, callback)
    run = replace(run, out=str(out), data_dir=absolute_data_dir(run.data_dir))
    data = cached_dataset(run.dataset, run.data_dir)
    if len(data) // run.clients < run.batch_size:
        raise ConfigError(
            f"{run.dataset} has {len(data)} images: {run.clients} clients cannot each hold "
            f"--batch-size {run.batch_size} of their own; use fewer clients or a smaller batch"
        )
    from gradleak.models import build_model

    model = build_model(
        run.model, input_shape=data.shape, num_classes=data.num_classes, width=run.width, seed=0
    )
    info = ModelInfo(run.model, data.shape, data.num_classes, model.gradleak_spec.width)
    if run.malicious != "none":
        import torch

        from gradleak.attacks.imprint import dishonest_attack

        # One line, before Flower starts, if the attack cannot use this model's layers.
        public = torch.stack([data[i][0] for i in range(max(0, len(data) - PUBLIC_IMAGES),
                                                        len(data))])  # fmt: skip
        dishonest_attack(model).craft(model, public)
    ray_temp = _flower_environment(out)  # before Flower is imported: it reads them at import
    from gradleak.integrations.flower import require_flower

    require_flower()
    if not _verbose():
        logging.getLogger("flwr").setLevel(logging.ERROR)  # it logs every round at INFO
    settings = run.recorded() | {"dataset_size": len(data), "model_info": info.to_json()}
    seconds, simulated = _simulate_once(run, settings, ray_temp, callback)
    audit = run_audit(
        AuditRun(
            captures=str(run.captures),
            out=str(out),
            method=run.method,
            iterations=run.iterations,
            tv_scale=run.tv_scale,
            seed=run.seed,
            workers=run.workers,
            command=run.command,
        ),
        callback=callback,
    )
    return DemoResult(seconds, simulated, audit)


def _text_demo(run: DemoRun, out: Path, callback: ProgressCallback | None) -> DemoResult:
    """`--task text`: simulate federated LoRA fine-tuning, then the text audit of its capture.

    The audit reads only the files on disk (capture and the clients' saved sentences).
    """
    spec = run.text_spec()
    ray_temp = _flower_environment(out)
    from gradleak.integrations.flower import require_flower

    require_flower()
    if not _verbose():
        logging.getLogger("flwr").setLevel(logging.ERROR)
    settings = run.recorded() | {"text_model": spec.to_json()}
    seconds, simulated = _simulate_once(run, settings, ray_temp, callback)
    audit = run_text_audit(run.captures, out, command=run.command, callback=callback)
    return DemoResult(seconds, simulated, audit)


def _simulate_once(
    run: DemoRun, settings: dict[str, Any], ray_temp: str, callback: ProgressCallback | None
) -> tuple[float, bool]:
    """Simulate unless OUT holds a finished run with the same settings; (seconds, simulated)."""
    demo_file = run.captures / DEMO_SETTINGS
    if demo_file.exists():
        held = _read_settings(demo_file)
        if held.get("settings") != settings:
            raise ConfigError(
                f"{run.out} holds a demo run with other settings; use another --out, or the same "
                "settings to resume its audit"
            )
        return float(held.get("simulation_seconds", 0.0)), False
    if run.captures.exists() and any(run.captures.iterdir()):
        raise ConfigError(
            f"{run.captures} holds captures of a simulation that did not finish; delete it or "
            "use another --out"
        )
    try:
        seconds = _simulate(run, ray_temp, callback)
    finally:
        if Path(ray_temp).is_symlink():
            Path(ray_temp).unlink()  # the short link to OUT/.ray (see _flower_environment)
    payload = {"settings": settings, "simulation_seconds": round(seconds, 3)}
    demo_file.write_text(json.dumps(payload, indent=1) + "\n")
    return seconds, True


def _simulate(run: DemoRun, ray_temp: str, callback: ProgressCallback | None) -> float:
    """Flower's simulation engine on Ray, the server in this process, the clients as actors."""
    from flwr.simulation import run_simulation

    rounds = 0

    def on_round(server_round: int) -> None:
        nonlocal rounds
        rounds += 1
        if callback is not None:
            callback("flower rounds", rounds, run.rounds)

    if callback is not None:
        callback("flower rounds", 0, run.rounds)  # the bar shows while Ray starts
    if run.task == "text":
        from gradleak.experiments.flower_demo.text_apps import make_text_apps

        server_app, client_app = make_text_apps(run, run.text_spec(), on_round)
    else:
        from gradleak.experiments.flower_demo.apps import make_apps

        server_app, client_app = make_apps(run, on_round)
    cpus = run.cpus or max(1, min(run.clients, cpu_count()))
    started = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=run.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": cpus,
                "num_gpus": 0,
                "_temp_dir": ray_temp,
                "include_dashboard": False,
                "logging_level": "INFO" if _verbose() else "ERROR",
                "log_to_driver": _verbose(),  # the clients' own log lines
            },
        },
    )
    seconds = time.perf_counter() - started
    if rounds != run.rounds and run.guard and run.secagg:
        # The clients' ModelGuard refused the crafted weights: SecAgg+ cannot finish a round
        # without them, so the server got nothing. That is the guard working, not a failure.
        log.warning("SecAgg+ completed %d of %d rounds: the clients refused", rounds, run.rounds)
        return seconds
    if rounds != run.rounds:
        raise ConfigError(
            f"the Flower simulation ended after {rounds} of {run.rounds} rounds; rerun with -v "
            "to see Flower's log"
        )
    return seconds


def _flower_environment(out: Path) -> str:
    """Offline, quiet, and with Flower's and Ray's state under OUT; returns Ray's temp folder."""
    os.environ.update(
        {
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_HOME": str(out / ".flwr"),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        }
    )
    ray_state = out / ".ray"
    ray_state.mkdir(parents=True, exist_ok=True)
    ray_temp = ray_state
    if len(str(ray_state)) > RAY_TEMP_MAX:
        # Too long for Ray's socket paths: Ray gets a short link in the temp folder that
        # points into OUT, so its state still lands under OUT.
        digest = hashlib.sha256(str(ray_state).encode()).hexdigest()[:12]
        ray_temp = Path(tempfile.gettempdir()) / f"gradleak-ray-{digest}"
        if ray_temp.is_symlink():
            ray_temp.unlink()
        ray_temp.symlink_to(ray_state, target_is_directory=True)
        log.info("Ray's state goes to %s through the link %s", ray_state, ray_temp)
    os.environ["RAY_TMPDIR"] = str(ray_temp)
    return str(ray_temp)


def _installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (Flower reads its settings then)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
        return False


def _verbose() -> bool:
    """Whether the user asked for logs (gradleak -v): then Flower's and Ray's are shown too."""
    return logging.getLogger().getEffectiveLevel() <= logging.INFO


def _read_settings(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(
            f"{path} is not readable JSON; delete the folder or use another --out"
        ) from None
    return value if isinstance(value, dict) else {}
