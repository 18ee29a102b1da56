"""Secure aggregation and larger batches: the attacker sees only a mean.

With secure aggregation the server learns the mean of k clients' gradients
and nothing about any one of them.  A client training on a batch of B
examples shares the mean of B per-example gradients.  For the mean
cross-entropy loss both are the same gradient: k single-example clients
aggregated give exactly the gradient of one client with those k examples.
`gradleak.threat.observe_aggregate` computes the mean; these factories say
how many clients and examples go into it.
"""

from __future__ import annotations

from gradleak.defenses.base import ClientDefense, GradientTransform


def aggregate(clients: int, *, transform: GradientTransform | None = None) -> ClientDefense:
    """Secure aggregation over `clients` single-example clients.

    Args:
        clients: k; the attacker sees the mean of k clients' gradients.
        transform: Applied by every client to its own gradient first.
    """
    if clients < 1:
        raise ValueError(f"aggregation needs 1 client or more, got {clients}")
    return ClientDefense("aggregate", float(clients), transform=transform, clients=int(clients))


def batch(examples: int, *, transform: GradientTransform | None = None) -> ClientDefense:
    """One client whose shared gradient averages a batch of `examples`."""
    if examples < 1:
        raise ValueError(f"a batch needs 1 example or more, got {examples}")
    return ClientDefense("batch", float(examples), transform=transform, examples=int(examples))
