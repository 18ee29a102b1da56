"""ModelGuard: false alarms on honest FedAvg, detection of crafted weights, and what evasion costs.

    .venv/bin/python bench/guard.py --data-dir DIR

1. Honest runs: FedAvg from a fresh init, R rounds x C clients per model (iDLG's LeNet,
   gradleak's ConvNet at width 8, the MLP, a quickstart-style Net on MNIST as RGB 32 x 32),
   each client 64 MNIST images, one epoch of mini-batches of 32, SGD with momentum 0.9 at
   lr 0.05. Every client checks every round's weights against the previous round's: the
   count of client-rounds checked and of alarms.
2. Attacks on the MLP (Flatten - Linear 784x1024 - ReLU - Linear): binning as crafted
   (attacks/imprint.py), and evasions: units shuffled with noise of relative size s on the
   trap rows and the equaliser columns; k bins among otherwise honest rows. For each:
   whether the guard refuses, and the share of a batch of 64 images the server still reads
   back exactly (MSE < 1e-4).
3. Pass-through crafted weights on the models with convolutions (attacks/passthrough.py:
   iDLG's LeNet, the ConvNet at width 8, the quickstart-style Net): refused or not, and why.
4. Time of one check of a ResNet-18's weights (11 M), alone and against the previous
   round's: the median and the fastest of 30.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from gradleak.attacks.imprint import Binning, BinningPlan, dishonest_attack
from gradleak.data import load_dataset
from gradleak.integrations.guard import inspect_weights
from gradleak.models import build_model
from gradleak.threat import observe, observe_update
from gradleak.types import ClientOptimizer, Observation

ROOT = Path(__file__).resolve().parent.parent


def honest(data, rgb, rounds: int, clients: int) -> tuple[int, int, list[str], float]:
    sys.path.insert(0, str(ROOT / "tests" / "apps" / "quickstart"))
    from qsapp.task import Net

    torch.manual_seed(0)
    models = {
        "lenet": (build_model("lenet", input_shape=(1, 28, 28), num_classes=10, seed=0), data),
        "convnet": (build_model("convnet", input_shape=(1, 28, 28), num_classes=10, seed=0,
                                width=8), data),
        "mlp": (build_model("mlp", input_shape=(1, 28, 28), num_classes=10, seed=0), data),
        "quickstart Net": (Net(), rgb),
    }  # fmt: skip
    checked, alarms, reasons, seconds = 0, 0, [], 0.0
    momentum = ClientOptimizer(momentum=0.9)
    for name, (model, images) in models.items():
        previous = None
        for round_ in range(rounds):
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            returned = []
            for client in range(clients):
                start = time.perf_counter()
                found = inspect_weights(state, previous)  # what this client's guard says
                seconds += time.perf_counter() - start
                checked += 1
                if found:
                    alarms += 1
                    reasons.append(f"{name} round {round_}: {found[0]}")
                first = (round_ * clients + client) * 64 % (len(images) - 64)
                x = torch.stack([images[i][0] for i in range(first, first + 64)])
                y = torch.tensor([images.label(i) for i in range(first, first + 64)])
                update = observe_update(
                    model,
                    x,
                    y,
                    local_lr=0.05,
                    epochs=1,
                    local_batch=32,
                    seed=round_ * 100 + client,
                    optimizer=momentum,
                )
                returned.append(update.returned)
            mean = {k: torch.stack([r[k].float() for r in returned]).mean(0).to(state[k].dtype)
                    for k in state}  # fmt: skip
            model.load_state_dict(mean)
            previous = state
    return checked, alarms, reasons, seconds / max(1, checked)


def evasions(data) -> list[tuple[str, bool, int]]:
    public = torch.stack([data[i][0] for i in range(9000, 10000)])
    x = torch.stack([data[i][0] for i in range(64)])
    y = torch.tensor([data.label(i) for i in range(64)])
    rows = []
    base = build_model("mlp", input_shape=(1, 28, 28), num_classes=10, seed=0)
    settings = [
        ("as crafted, 1,024 bins", 1024, 0.0, False),
        ("64 bins, rest zero", 64, 0.0, False),
    ]
    for noise in (1e-3, 1e-2, 1e-1):
        settings.append((f"shuffled, noise {noise:g}", 1024, noise, True))
    for bins in (256, 64, 16, 8, 4):
        settings.append((f"{bins} bins among honest rows, shuffled", bins, 0.0, True))
    for label, bins, noise, hide in settings:
        crafted, plan = Binning(bins=bins).craft(base, public)
        order = torch.arange(1024)
        generator = torch.Generator().manual_seed(1)
        if hide:
            with torch.no_grad():
                trap, following = crafted.fc1, crafted.fc2
                if bins < 1024:  # the other units keep the honest model's weights
                    trap.weight[bins:] = base.fc1.weight[bins:]
                    trap.bias[bins:] = base.fc1.bias[bins:]
                    following.weight[:, bins:] = base.fc2.weight[:, bins:]
                scale = float(trap.weight[:bins].abs().mean())
                trap.weight[:bins] += noise * scale * torch.randn(bins, 784, generator=generator)
                column = float(following.weight[:, :bins].abs().mean())
                following.weight[:, :bins] += (
                    noise * column * torch.randn(10, bins, generator=generator)
                )
                order = torch.randperm(1024, generator=generator)
                trap.weight.copy_(trap.weight[order])
                trap.bias.copy_(trap.bias[order])
                following.weight.copy_(following.weight[:, order])
        refused = bool(inspect_weights(crafted.state_dict()))
        shared = observe(crafted, x, y)
        inverse = torch.argsort(order)  # the server knows where it put each bin
        gradients = tuple(
            g[inverse] if name.startswith("fc1") else g
            for name, g in zip(shared.parameter_names, shared.gradients, strict=True)
        )
        seen = Observation(shared.model, gradients, shared.parameter_names, shared.input_shape,
                           shared.num_classes, shared.batch_size)  # fmt: skip
        recovered = Binning().decode(seen, BinningPlan(plan.layer, plan.thresholds,
                                                       plan.input_shape)).inputs  # fmt: skip
        errors = ((recovered[:, None] - x[None]) ** 2).flatten(2).mean(-1)
        exact = int((errors.min(0).values < 1e-4).sum())
        rows.append((label, refused, exact))
        del crafted
    return rows


def passthrough(data, rgb) -> list[tuple[str, bool, str, int]]:
    """Pass-through crafted weights, as crafted and with noise on the channels they leave
    unused (zero kernels filled, to hide them): refused or not, and the images of 16 (labels
    of the first 16 MNIST images: most classes present once or twice) read back exactly at
    the stated resolution, with the clients in eval mode."""
    from qsapp.task import Net  # on sys.path since honest()

    torch.manual_seed(0)
    models = {
        "LeNet, output rows": (build_model("lenet", input_shape=(1, 28, 28), num_classes=10,
                                           seed=0), data),
        "ConvNet w=8, output rows": (build_model("convnet", input_shape=(1, 28, 28),
                                                 num_classes=10, seed=0, width=8), data),
        "quickstart Net, binning": (Net(), rgb),
    }  # fmt: skip
    rows = []
    for name, (model, images) in models.items():
        public = torch.stack([images[i][0] for i in range(9000, 9300)])
        x = torch.stack([images[i][0] for i in range(16)])
        y = torch.tensor([images.label(i) for i in range(16)])
        attack = dishonest_attack(model)
        crafted, plan = attack.craft(model, public)
        for label, hide in ((name, False), (f"{name}, noise on unused channels", True)):
            sent = copy.deepcopy(crafted)
            if hide:
                generator = torch.Generator().manual_seed(1)
                with torch.no_grad():
                    for conv in (m for m in sent.modules() if isinstance(m, torch.nn.Conv2d)):
                        unused = conv.weight.flatten(1).abs().sum(1) == 0
                        noise = torch.randn(conv.weight[unused].shape, generator=generator)
                        conv.weight[unused] = 0.01 * noise
            found = inspect_weights(sent.state_dict())
            recovered = attack.decode(observe(sent, x, y, batchnorm="eval"), plan).inputs
            reduced = plan.front.reduce(x)
            errors = ((recovered.double()[:, None] - reduced[None]) ** 2).flatten(2).mean(-1)
            exact = int((errors.min(0).values < 1e-4).sum())
            rows.append((label, bool(found), "; ".join(found[:2]), exact))
    return rows


def timing(repeats: int = 30) -> list[tuple[str, float, float]]:
    state = build_model("resnet18", input_shape=(3, 32, 32), num_classes=10, seed=0).state_dict()
    previous = {k: v.clone() for k, v in state.items()}
    rows = []
    for label, args in (("alone", (state,)), ("with the previous round", (state, previous))):
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            inspect_weights(*args)
            seconds.append(time.perf_counter() - start)
        rows.append((label, statistics.median(seconds) * 1000, min(seconds) * 1000))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("mnist", data_dir=args.data_dir)
    rgb = load_dataset("mnist", data_dir=args.data_dir, shape=(3, 32, 32))
    checked, alarms, reasons, per_check = honest(data, rgb, args.rounds, args.clients)
    print(f"honest FedAvg: {checked} client-rounds checked, {alarms} alarms, "
          f"{per_check * 1000:.1f} ms a check")  # fmt: skip
    for reason in reasons[:10]:
        print("  alarm:", reason)
    print()
    print("| pass-through weights sent | ModelGuard | first reasons | read back exactly of 16 |")
    print("|---|---|---|---|")
    for label, refused, why, exact in passthrough(data, rgb):
        print(f"| {label} | {'refused' if refused else 'passed'} | {why} | {exact} |")
    print()
    for label, median, fastest in timing():
        print(
            f"ResNet-18, {label}: {median:.1f} ms a check (median of 30), fastest {fastest:.1f} ms"
        )
    print()
    print("| weights sent | ModelGuard | images of 64 read back exactly |")
    print("|---|---|---|")
    for label, refused, exact in evasions(data):
        print(f"| {label} | {'refused' if refused else 'passed'} | {exact} |")


if __name__ == "__main__":
    main()
