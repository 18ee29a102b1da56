"""A dishonest server's weights on real architectures: share read back exactly, per batch size.

    .venv/bin/python bench/trap_models.py --data-dir DIR [--seeds 3] [--convnet-width 32]

For iDLG's LeNet, gradleak's ConvNet and a quickstart-style Net (Flower's
quickstart-pytorch CNN, imported by path from tests/apps/quickstart as a user's own
model), the server crafts the weights (`attacks/imprint.py`, `attacks/passthrough.py`:
binning where the model has two Linear layers, the output layer's rows where it has
one; convolutions set to pass the input through) on its own images (the dataset's last
300), one client takes one FedSGD step on a batch of B images drawn with the seed, and the
server decodes.  Reported per model and B, averaged over the seeds: the share of the
batch read back exactly (MSE < 1e-4 against the original reduced the way the crafted
layers reduce it) and the PSNR of those pictures (painted at full size) against the
full-resolution originals.  CIFAR-100 (the sample's 916 images; the Net has 10 outputs,
so its labels are folded mod 10) and MNIST (LeNet and the ConvNet on 1 x 28 x 28).
The ConvNet has BatchNorm: exact in eval mode; in train mode (a client calling
``model.train()``) every channel carries one affine map the server does not know, so
the table shows the share exact after fitting that map per channel with the truth
("up to affine"), and the PSNR of the server's own estimate (fitted on its images).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from gradleak import metrics
from gradleak.attacks.imprint import dishonest_attack
from gradleak.data import load_dataset
from gradleak.models import build_model
from gradleak.threat import observe

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = 300
EXACT = 1e-4


def quickstart_net() -> torch.nn.Module:
    sys.path.insert(0, str(ROOT / "tests" / "apps" / "quickstart"))
    from qsapp.task import Net

    torch.manual_seed(0)  # the Net draws its init from the global generator
    return Net()


def affine_exact(recovered: torch.Tensor, reduced: torch.Tensor) -> torch.Tensor:
    """Per example, MSE after one scale and shift per channel fitted over the whole batch."""
    fitted = recovered.clone()
    for c in range(recovered.shape[1]):
        a = recovered[:, c].reshape(-1, 1)
        a = torch.cat([a, torch.ones_like(a)], 1)
        solution = torch.linalg.lstsq(a, reduced[:, c].reshape(-1, 1)).solution
        fitted[:, c] = (a @ solution).reshape(recovered[:, c].shape)
    return ((fitted - reduced) ** 2).flatten(1).mean(1)


def one(name: str, model, data, batch: int, seed: int, batchnorm: str) -> dict:
    n = len(data)
    public = torch.stack([data[i][0] for i in range(n - PUBLIC, n)])
    torch.manual_seed(seed)
    attack = dishonest_attack(model)
    crafted, plan = attack.craft(model, public)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n - PUBLIC, generator=generator)[:batch].tolist()
    x = torch.stack([data[i][0] for i in chosen])
    classes = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].out_features
    y = torch.tensor([data.label(i) for i in chosen]) % classes
    started = time.perf_counter()
    result = attack.decode(observe(crafted, x, y, batchnorm=batchnorm), plan)
    seconds = time.perf_counter() - started
    recovered = result.inputs.double()
    reduced = plan.front.reduce(x)
    errors = ((recovered[:, None] - reduced[None]) ** 2).flatten(2).mean(-1)
    best, which = errors.min(0)
    exact = best < EXACT
    row = {"exact": int(exact.sum()), "resolution": plan.front.resolution, "attack": attack.name,
           "seconds": seconds}  # fmt: skip
    psnrs = [metrics.psnr(recovered[int(which[i])], x[i]) for i in range(batch) if exact[i]]
    if batchnorm == "train":  # match by label: an example alone in its class has its own row
        alone = [i for i in range(batch) if int((y == y[i]).sum()) == 1]
        rows = {int(label): k for k, label in enumerate(result.labels)}
        pairs = [(rows[int(y[i])], i) for i in alone if int(y[i]) in rows]
        if pairs:
            fit = affine_exact(recovered[[k for k, _ in pairs]], reduced[[i for _, i in pairs]])
            row["affine"] = int((fit < EXACT).sum())
            psnrs = [metrics.psnr(recovered[k], x[i]) for k, i in pairs]
        else:
            row["affine"] = 0
    row["psnr"] = [p for p in psnrs if math.isfinite(p)]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--convnet-width", type=int, default=32)
    parser.add_argument("--batches", default="8,32,128")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cifar = load_dataset("cifar100", data_dir=args.data_dir)
    mnist = load_dataset("mnist", data_dir=args.data_dir)
    w = args.convnet_width
    cases = [
        ("LeNet (iDLG)", "CIFAR-100", lambda: build_model(
            "lenet", input_shape=(3, 32, 32), num_classes=100, seed=0), cifar, None),
        ("LeNet (iDLG)", "MNIST", lambda: build_model(
            "lenet", input_shape=(1, 28, 28), num_classes=10, seed=0), mnist, None),
        (f"ConvNet w={w}, eval", "CIFAR-100", lambda: build_model(
            "convnet", input_shape=(3, 32, 32), num_classes=100, seed=0, width=w), cifar, "eval"),
        (f"ConvNet w={w}, train", "CIFAR-100", lambda: build_model(
            "convnet", input_shape=(3, 32, 32), num_classes=100, seed=0, width=w), cifar, "train"),
        (f"ConvNet w={w}, eval", "MNIST", lambda: build_model(
            "convnet", input_shape=(1, 28, 28), num_classes=10, seed=0, width=w), mnist, "eval"),
        ("quickstart Net", "CIFAR-100", quickstart_net, cifar, None),
    ]  # fmt: skip
    print("| model | data | attack | resolution | B | exact | exact share | PSNR (dB) | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, dataset, build, data, mode in cases:
        for batch in [int(b) for b in args.batches.split(",")]:
            rows = [one(name, build(), data, batch, seed, mode or "train")
                    for seed in range(args.seeds)]  # fmt: skip
            key = "affine" if mode == "train" else "exact"
            total = sum(r[key] for r in rows)
            psnr = [p for r in rows for p in r["psnr"]]
            mean_psnr = f"{sum(psnr) / len(psnr):.1f}" if psnr else "-"
            label = f"{total} of {batch * args.seeds}" + (
                " up to affine" if key == "affine" else ""
            )
            print(f"| {name} | {dataset} | {rows[0]['attack']} | {rows[0]['resolution']} | {batch} "
                  f"| {label} | {total / (batch * args.seeds):.0%} | {mean_psnr} "
                  f"| {sum(r['seconds'] for r in rows) / len(rows):.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
