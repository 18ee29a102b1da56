"""One thread or two for a single attack on the CPU?

Times gradient-matching evaluations (forward, gradient with create_graph,
gradient of the distance) of iDLG's LeNet on one image, with 1 and with 2
intra-op threads, in one run, and prints the ratio.  This is why
`gradleak attack` uses one thread on the CPU (experiments/common.py).

    .venv/bin/python bench/threads.py
"""

from __future__ import annotations

import time

import torch

from gradleak import build_model, observe
from gradleak.attacks.matching import matching_loss
from gradleak.data import load_dataset


def ms_per_evaluation(dataset: str, threads: int, repeats: int = 200) -> float:
    torch.set_num_threads(threads)
    data = load_dataset(dataset)
    image, label = data[0]
    model = build_model("lenet", input_shape=data.shape, num_classes=data.num_classes, seed=0)
    observation = observe(model, image, torch.tensor(label))
    parameters = list(model.parameters())
    dummy = torch.randn(1, *data.shape, requires_grad=True)
    labels = torch.tensor([label])

    def evaluate() -> None:
        loss = matching_loss(model, parameters, observation.gradients, dummy, labels=labels)
        torch.autograd.grad(loss, [dummy])

    for _ in range(20):
        evaluate()
    start = time.perf_counter()
    for _ in range(repeats):
        evaluate()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    print("| dataset | 1 thread (ms/eval) | 2 threads (ms/eval) | 2 threads / 1 thread |")
    print("|---|---|---|---|")
    for dataset in ("sample", "sample-cifar100"):
        one = ms_per_evaluation(dataset, 1)
        two = ms_per_evaluation(dataset, 2)
        print(f"| {dataset} | {one:.2f} | {two:.2f} | {two / one:.2f}x |")


if __name__ == "__main__":
    main()
