"""The linear layers' outer-product structure (lowrank.py) against the plain objective.

The explicit objective never forms a linear layer's weight gradient: it uses
the shared gradient's own factors where that gradient is exactly of rank one,
and products with it where a defense or a batch breaks that.  Either way it
must give the plain (vmapped) objective's values and gradients, in float64 to
1e-9, with and without defenses.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradleak import build_model, observe
from gradleak.attacks.lowrank import LARGE, Matrices, SharedGradient, rank_one_factors
from gradleak.attacks.objective import BatchedObjective
from gradleak.defenses import dp_sgd, fp16, gaussian, prune
from gradleak.types import Observation

DEFENSES = {
    "none": {},
    "gaussian 1e-3": {"defense": gaussian(1e-3, seed=0)},
    "prune 0.3": {"defense": prune(0.3)},
    "dp clipping": {"step": dp_sgd(0.0, max_grad_norm=0.1)},
    "dp-sgd 1e-2": {"step": dp_sgd(1e-2, max_grad_norm=0.1, seed=1)},
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def victims(
    count: int,
    *,
    batch: int = 1,
    defense: str = "none",
    shape: tuple[int, int, int] = (1, 28, 28),
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    labels: list[torch.Tensor] | None = None,
) -> list[Observation]:
    """Seeded victims (a LeNet, random inputs); their labels go to `labels` if given."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for v in range(count):
        net = build_model("lenet", input_shape=shape, num_classes=10, seed=seed + v).to(dtype)
        x = torch.rand(batch, *shape, generator=generator, dtype=dtype)
        y = torch.randperm(10, generator=generator)[:batch]
        out.append(observe(net, x, y, **DEFENSES[defense]))
        if labels is not None:
            labels.append(y)
    return out


def test_an_undefended_gradient_gives_its_factors_and_defenses_break_them() -> None:
    for dtype in (torch.float32, torch.float64):
        clean = victims(1, dtype=dtype)[0].gradients[-2]
        factors = rank_one_factors(clean)
        assert factors is not None
        e0, h0 = factors
        gap = (clean.double() - e0[:, None] * h0[None, :]).abs().max()
        assert float(gap) <= 8 * torch.finfo(dtype).eps * float(clean.abs().max())
    clipped = victims(1, defense="dp clipping")[0].gradients[-2]
    assert rank_one_factors(clipped) is not None  # clipping scales, the rank stays one
    for defense in ("gaussian 1e-3", "prune 0.3", "dp-sgd 1e-2"):
        assert rank_one_factors(victims(1, defense=defense)[0].gradients[-2]) is None, defense
    assert rank_one_factors(fp16()(victims(1)[0].gradients)[-2]) is None
    assert rank_one_factors(victims(1, batch=2)[0].gradients[-2]) is None
    assert rank_one_factors(torch.zeros(4, 3)) is None


def structured_and_plain(objective: BatchedObjective, z: torch.Tensor, rows: list[int]) -> list:
    results = []
    for path in ("vmapped", "explicit"):
        objective.use(path)
        objective.select(torch.tensor(rows))
        results.append(objective(z[: len(rows)]))
    return results


@pytest.mark.parametrize("defense", list(DEFENSES))
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("learned", [False, True], ids=["known labels", "learned labels"])
def test_structured_objective_equals_the_plain_one(defense: str, batch: int, learned: bool) -> None:
    true: list[torch.Tensor] = []
    observations = victims(4, batch=batch, defense=defense, labels=true)
    labels = None if learned else torch.stack(true)  # the objective takes any labels
    objective = BatchedObjective(observations, labels, torch.float64)
    generator = torch.Generator().manual_seed(5)
    z = torch.rand(4, objective.size, generator=generator, dtype=torch.float64)
    (loss_p, grad_p), (loss_s, grad_s) = structured_and_plain(objective, z, [3, 0, 2])
    torch.testing.assert_close(loss_s, loss_p, rtol=1e-9, atol=0)
    torch.testing.assert_close(grad_s, grad_p, rtol=1e-9, atol=1e-12 * float(grad_p.abs().max()))
    shared = objective._explicit.layers[-1].shared  # which way the last layer went
    factored = batch == 1 and defense in ("none", "dp clipping")
    assert (shared.dense is None) == factored


def test_victims_with_and_without_factors_share_one_objective() -> None:
    # A chunk of clean and pruned victims: each victim's last layer goes its own way.
    mixed = [victims(1, seed=10)[0], victims(1, defense="prune 0.3", seed=11)[0]]
    mixed += [victims(1, seed=12)[0], victims(1, defense="gaussian 1e-3", seed=13)[0]]
    objective = BatchedObjective(mixed, None, torch.float64)
    assert objective._explicit.layers[-1].shared.dense_rows.tolist() == [1, 3]
    generator = torch.Generator().manual_seed(6)
    z = torch.rand(4, objective.size, generator=generator, dtype=torch.float64)
    for rows in ([0, 1, 2, 3], [3, 2], [0, 2], [1]):
        (loss_p, grad_p), (loss_s, grad_s) = structured_and_plain(objective, z, rows)
        torch.testing.assert_close(loss_s, loss_p, rtol=1e-9, atol=0)
        torch.testing.assert_close(
            grad_s, grad_p, rtol=1e-9, atol=1e-12 * float(grad_p.abs().max())
        )


def wide_net(seed: int, dtype: torch.dtype) -> nn.Module:
    """A conv net whose last layer is large enough to stay per victim (LFW-like)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.Sigmoid(), nn.Flatten(),
        nn.Linear(4 * 8 * 8, 4096),
    ).to(dtype)  # fmt: skip


@pytest.mark.parametrize("compute", [torch.float64, torch.float32])
@pytest.mark.parametrize("defense", ["none", "gaussian 1e-3"])
def test_a_large_last_layer_is_used_in_place_not_copied(compute: torch.dtype, defense: str) -> None:
    generator = torch.Generator().manual_seed(2)
    observations = []
    for v in range(3):
        net = wide_net(v, torch.float64)
        x = torch.rand(1, 1, 16, 16, generator=generator, dtype=torch.float64)
        observations.append(observe(net, x, torch.tensor([v * 7]), **DEFENSES[defense]))
    assert LARGE <= 4096 * 256
    objective = BatchedObjective(observations, None, compute)
    z = torch.rand(3, objective.size, generator=generator, dtype=compute)
    (loss_p, grad_p), (loss_s, grad_s) = structured_and_plain(objective, z, [2, 0, 1])
    weights = objective._explicit_all.layers[-1].weight
    assert weights._list is not None  # per victim: the observations' own tensors
    own = [dict(o.model.named_parameters())["3.weight"] for o in observations]
    assert all(w.data_ptr() == o.data_ptr() for w, o in zip(weights._list, own, strict=True))
    # float32 products of float64 weights are converted block by block, then,
    # for a victim that takes part in CONVERT_AFTER products, from a kept copy.
    rtol = 1e-9 if compute == torch.float64 else 1e-4
    scale = float(grad_p.abs().max())
    for _ in range(3):
        torch.testing.assert_close(loss_s, loss_p, rtol=rtol, atol=0)
        torch.testing.assert_close(grad_s, grad_p, rtol=rtol, atol=rtol * 1e-3 * scale)
        loss_s, grad_s = objective(z)
    converted = objective._explicit.layers[-1].weight._converted
    assert len(converted) == (3 if compute == torch.float32 else 0)


def test_products_and_terms_against_the_formed_matrices() -> None:
    # lowrank.py's pieces on their own, against the matrices written out.
    g = torch.Generator().manual_seed(0)
    victims_, outputs, features, batch = 3, 7, 5, 2
    weights = [torch.randn(outputs, features, generator=g, dtype=torch.float64) for _ in range(3)]
    e = torch.randn(victims_, outputs, batch, generator=g, dtype=torch.float64)
    h = torch.randn(victims_, features, batch, generator=g, dtype=torch.float64)
    shared = [torch.randn(outputs, features, generator=g, dtype=torch.float64) for _ in range(3)]
    m = Matrices(weights, torch.float64)
    torch.testing.assert_close(
        m.times(h), torch.stack([w @ x for w, x in zip(weights, h, strict=True)])
    )
    torch.testing.assert_close(
        m.transposed_times(e), torch.stack([w.T @ y for w, y in zip(weights, e, strict=True)])
    )
    loss, rh, rte = SharedGradient(shared, batch).terms(e, h)
    for v in range(victims_):
        r = e[v] @ h[v].T - shared[v]
        torch.testing.assert_close(loss[v], r.pow(2).sum())
        torch.testing.assert_close(rh[v], r @ h[v])
        torch.testing.assert_close(rte[v], r.T @ e[v])


def test_rows_that_share_a_large_matrix_share_its_pass() -> None:
    # Two attacks on one victim hold the same weights: one product with two
    # columns must give what two products give.
    g = torch.Generator().manual_seed(1)
    big = [torch.randn(2048, 600, generator=g) for _ in range(2)]
    assert big[0].numel() >= LARGE
    m = Matrices([big[0], big[1], big[0]], torch.float32)
    x = torch.randn(3, 600, 1, generator=g)
    y = torch.randn(3, 2048, 1, generator=g)
    for row, matrix in enumerate([big[0], big[1], big[0]]):
        torch.testing.assert_close(m.times(x)[row], matrix @ x[row], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(
            m.transposed_times(y)[row], matrix.T @ y[row], rtol=1e-5, atol=1e-4
        )
