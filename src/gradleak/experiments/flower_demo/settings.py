"""The settings of one `gradleak flower-demo` run (no Flower import: the CLI checks them first)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradleak.errors import ConfigError

if TYPE_CHECKING:
    from gradleak.experiments.flower_demo.text_task import TextModelSpec

DP_MODES = ("none", "server-fixed", "client-fixed", "local")
# "binning" and "trap" both send what `dishonest_attack` crafts for the model: binning with
# two Linear layers, the output layer's rows with one, convolutions set to pass the input through.
MALICIOUS = ("none", "binning", "trap")
CAPTURES = "captures"
MALICIOUS_SECAGG_LR = 10.0
TASKS = ("image", "text")
# The text task's defaults (`gradleak flower-demo --task text`): under a minute here, and every
# round leaks, measured (README, "Federated fine-tuning of a language model").
TEXT_DEFAULTS = {"model": "gpt2-tiny", "lr": 0.5, "local_steps": 3, "batch_size": 1, "rounds": 3}
PUBLIC_IMAGES = 1000  # the dishonest server sets its bins on the split's last images


@dataclass(frozen=True)
class DemoRun:
    """One `gradleak flower-demo` invocation.

    Attributes:
        clients: Flower SuperNodes (simulated clients), every one trained each round.
        rounds: Federated rounds.
        dataset: Where the clients' private images come from (its test split).
        model: The model they train, from gradleak's registry.
        width: Base width of "convnet" or "resnet18".
        local_steps: SGD steps per client per round (K), each on the whole batch.
        batch_size: Private images per client per round (B).
        lr: The clients' SGD learning rate.
        flower_dp: Flower's differential privacy: "none"; "server-fixed" (the
            server clips each update and noises the aggregate); "client-fixed"
            (the clients clip, `fixedclipping_mod`, the server noises the
            aggregate); "local" (the clients clip and add noise, `LocalDpMod`).
        secagg: SecAgg+ on Flower's legacy stack (its only stack with it).
        dp_clipping_norm: The clipping norm of every DP mode.
        dp_noise_multiplier: The central modes' noise multiplier.
        dp_epsilon: LocalDpMod's epsilon (its sensitivity is the clipping norm).
        dp_delta: LocalDpMod's delta.
        seed: Fixes the initial model, the clients' batches and the attacks.
        data_dir: The data folder (None: the default).
        out: Everything goes here: captures/, the audit's files, Flower's and Ray's state.
        method, iterations, tv_scale, workers: passed to the audit.
        cpus: CPUs Ray may use for the clients (None: the cores here, at most `clients`).
        command: The command line, quoted in the report.
        malicious: "none", or "binning"/"trap": the server sends weights crafted to
            read the clients' images back (`attacks/imprint.py`) every round.
        guard: The clients run `ModelGuard`, refusing weights that look crafted.
        task: "image" (the default) or "text": federated LoRA fine-tuning of a
            built-in decoder (`model` then names it), clients holding private
            sentences (`text_task.py`); `batch_size` is then sentences per round.
        sentences_per_client: The text task's private sentences per client.
        lora_rank: The text task's LoRA rank r.
        lora_alpha: The text task's LoRA alpha.
    """

    clients: int = 4
    rounds: int = 2
    dataset: str = "mnist"
    model: str = "lenet"
    width: int | None = None
    local_steps: int = 1
    batch_size: int = 1
    lr: float = 0.01
    flower_dp: str = "none"
    secagg: bool = False
    dp_clipping_norm: float = 0.1
    dp_noise_multiplier: float = 1.0
    dp_epsilon: float = 10.0
    dp_delta: float = 1e-5
    seed: int = 0
    data_dir: str | None = None
    out: str = "runs/flower-demo"
    method: str = "auto"
    iterations: int | None = None
    tv_scale: float = 1e-3
    workers: int | None = None
    cpus: int | None = None
    command: str = ""
    malicious: str = "none"
    guard: bool = False
    task: str = "image"
    sentences_per_client: int = 4
    lora_rank: int = 32
    lora_alpha: float = 64.0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "text":
            self._check_text()
        for name in ("clients", "rounds", "local_steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be 1 or more, got {value!r}")
        if self.clients < 2:
            raise ConfigError(
                f"--clients must be 2 or more (FedAvg averages clients), got {self.clients}"
            )
        if self.flower_dp not in DP_MODES:
            raise ConfigError(
                f"--flower-dp must be one of {', '.join(DP_MODES)}, got {self.flower_dp!r}"
            )
        if self.secagg and self.flower_dp != "none":
            raise ConfigError(
                "--secagg runs on Flower's legacy stack, where the demo has no DP: "
                "give --secagg or --flower-dp, not both"
            )
        positive = {
            "--lr": self.lr,
            "--dp-clipping-norm": self.dp_clipping_norm,
            "--dp-epsilon": self.dp_epsilon,
            "--dp-delta": self.dp_delta,
        }
        for flag, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{flag} must be a number above 0, got {value:g}")
        if not (math.isfinite(self.dp_noise_multiplier) and self.dp_noise_multiplier >= 0):
            raise ConfigError(
                f"--dp-noise-multiplier must be 0 or more, got {self.dp_noise_multiplier:g}"
            )
        if self.malicious not in MALICIOUS:
            raise ConfigError(
                f"--malicious must be one of {', '.join(MALICIOUS)}, got {self.malicious!r}"
            )
        if self.cpus is not None and self.cpus < 1:
            raise ConfigError(f"--cpus must be 1 or more, got {self.cpus}")

    def _check_text(self) -> None:
        """The text task runs plain FedAvg: Flower's privacy options and the image-only ones
        are refused in one line, as are a LoRA rank or a split the model and sentences cannot
        take (`text_task.text_spec`, `check_text_run`)."""
        from gradleak.experiments.flower_demo.text_task import check_text_run, text_spec
        from gradleak.experiments.text.batch import shipped_sentences

        if self.flower_dp != "none" or self.secagg or self.malicious != "none" or self.guard:
            raise ConfigError(
                "--task text runs plain FedAvg: --flower-dp, --secagg, --malicious and --guard "
                "go with --task image"
            )
        text_spec(self.model, seed=self.seed, rank=self.lora_rank, alpha=self.lora_alpha)
        check_text_run(
            shipped_sentences(), clients=self.clients,
            per_client=self.sentences_per_client, batch_size=self.batch_size,
        )  # fmt: skip

    def text_spec(self) -> TextModelSpec:
        """What the capture records of the text task's model (`text_task.TextModelSpec`)."""
        from gradleak.experiments.flower_demo.text_task import text_spec

        return text_spec(self.model, seed=self.seed, rank=self.lora_rank, alpha=self.lora_alpha)

    @property
    def captures(self) -> Path:
        return Path(self.out) / CAPTURES

    def train_config(self) -> dict[str, Any]:
        """What the server sends every client each round (Flower adds "server-round").

        A dishonest server under SecAgg+ also sets the learning rate: SecAgg+ clips each
        update entry to [-8, 8] and quantises it in steps of about 4e-6, below which a
        one-step update of lr 0.01 mostly lies; at lr `MALICIOUS_SECAGG_LR` it does not.
        """
        lr = self.lr
        if self.malicious != "none" and self.secagg:
            lr = max(lr, MALICIOUS_SECAGG_LR)
        return {"lr": lr, "local-steps": self.local_steps, "batch-size": self.batch_size}

    def recorded(self) -> dict[str, Any]:
        """The settings that decide what the simulation produces (demo.json)."""
        keep = (
            "clients", "rounds", "dataset", "model", "width", "local_steps", "batch_size", "lr",
            "flower_dp", "secagg", "dp_clipping_norm", "dp_noise_multiplier", "dp_epsilon",
            "dp_delta", "seed", "malicious", "guard",
        )  # fmt: skip
        if self.task == "text":
            keep = (
                "task", "clients", "rounds", "model", "local_steps", "batch_size", "lr", "seed",
                "sentences_per_client", "lora_rank", "lora_alpha",
            )  # fmt: skip
        values = dataclasses.asdict(self)
        return {key: values[key] for key in keep}
