"""How far the shared gradient's direction moves when the image moves a little.

Inverting Gradients matches the direction of the gradient (cosine distance).
If a small change of the image already turns that direction far away, the
objective is rough and the attack's descent stalls; if a large change barely
moves it, the objective cannot tell a noisy image from the true one.  This
tool measures both, on one image: the cosine distance between the gradient
of the true image and that of the image plus Gaussian noise of a given
standard deviation (clamped to [0, 1]), for the client's BatchNorm in train
mode and in eval mode, averaged over a few noise draws.

    .venv/bin/python tools/ig_landscape.py --model convnet --width 16 --dataset sample-cifar100
    .venv/bin/python tools/ig_landscape.py --weights convnet.safetensors --width 32 ...

The model is fresh (seed 0) unless --weights names trained weights.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from gradleak import build_model, observe
from gradleak.attacks.inverting import cosine_distance
from gradleak.data import load_dataset
from gradleak.models.weights import load_weights

NOISE = (0.001, 0.01, 0.03, 0.1, 0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--dataset", default="sample-cifar100")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--draws", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset(args.dataset, data_dir=args.data_dir)
    image, label = data[args.index]
    model = build_model(args.model, input_shape=data.shape, num_classes=data.num_classes,
                        seed=0, width=args.width)  # fmt: skip
    if args.weights:
        load_weights(model, args.weights)
    y = torch.tensor([label])
    weights = args.weights or "fresh weights"
    print(f"{args.model} width {args.width} ({weights}), {args.dataset}[{args.index}]: cosine "
          f"distance of the gradient at image + noise to the gradient at the image, mean of "
          f"{args.draws} draws")  # fmt: skip
    print("| noise std | PSNR of the noisy image | train mode | eval mode |")
    print("|---|---|---|---|")
    truth = {m: observe(model, image[None], y, batchnorm=m).gradients for m in ("train", "eval")}
    generator = torch.Generator().manual_seed(0)
    for std in NOISE:
        distances: dict[str, list[float]] = {"train": [], "eval": []}
        psnrs = []
        for _ in range(args.draws):
            noisy = (image + std * torch.randn(image.shape, generator=generator)).clamp(0, 1)
            psnrs.append(float(-10 * torch.log10(((noisy - image) ** 2).mean())))
            for mode, gradient in truth.items():
                moved = observe(model, noisy[None], y, batchnorm=mode).gradients
                distances[mode].append(float(cosine_distance(moved, gradient)))
        print(f"| {std:g} | {statistics.mean(psnrs):.1f} dB | "
              f"{statistics.mean(distances['train']):.2e} | "
              f"{statistics.mean(distances['eval']):.2e} |")  # fmt: skip


if __name__ == "__main__":
    main()
