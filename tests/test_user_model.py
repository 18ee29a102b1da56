"""The user's own setup: a model by import path, its fingerprint, normalised inputs, image
folders, and the label histogram read from a momentum client's update."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gradleak.attacks.labels import update_label_counts
from gradleak.data import load_dataset
from gradleak.errors import ConfigError, DataError
from gradleak.models import resolve_model
from gradleak.models.user import (
    build_user_model,
    fingerprint,
    infer_input_shape,
    normalize_input,
    parse_model_args,
    parse_normalization,
)
from gradleak.threat import observe_update
from gradleak.types import ClientOptimizer

APP = Path(__file__).parent / "apps" / "quickstart"


@pytest.fixture()
def app_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(APP))
    yield
    for name in [m for m in sys.modules if m == "qsapp" or m.startswith("qsapp.")]:
        del sys.modules[name]


def test_a_model_by_import_path_is_built_seeded_and_fingerprinted(app_on_path: None) -> None:
    a = resolve_model("qsapp.task:Net", input_shape=None, num_classes=10, seed=3)
    b = resolve_model("qsapp.task:Net", input_shape=None, num_classes=10, seed=3)
    c = resolve_model("qsapp.task:Net", input_shape=None, num_classes=10, seed=4)
    assert type(a).__name__ == "Net" and a.gradleak_spec.input_shape == (3, 32, 32)
    assert a.gradleak_spec.num_classes == 10 and a.gradleak_spec.name == "qsapp.task:Net"
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    # The fingerprint is the architecture's, not the weights'.
    assert fingerprint(a) == fingerprint(c)
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 5), torch.nn.Flatten())
    assert fingerprint(other) != fingerprint(a)
    with pytest.raises(ConfigError, match="10 outputs but the data has 100 classes"):
        resolve_model("qsapp.task:Net", input_shape=None, num_classes=100)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("qsapp.nothere:Net", "cannot import 'qsapp.nothere'"),
        ("qsapp.task:Nope", "has no 'Nope'"),
        ("qsapp.task:normalize", "failed"),  # a function that needs an argument
        ("not a path", "not an import path"),
        ("qsapp.task:train", "failed"),
    ],
)
def test_a_model_path_that_does_not_build_is_one_line(
    app_on_path: None, path: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        build_user_model(path)


def test_a_factory_that_returns_no_module_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "userfactory.py").write_text("def make(width=2):\n    return [width]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="not a torch nn.Module"):
        build_user_model("userfactory:make", parse_model_args(["width=3"]))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_model_args(["width"])


def test_normalisation_feeds_the_model_normalised_pixels(app_on_path: None) -> None:
    model = build_user_model("qsapp.task:Net", seed=0)
    plain = build_user_model("qsapp.task:Net", seed=0)
    normalize_input(model, parse_normalization("0.5,0.5", 3))
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model(x), plain((x - 0.5) / 0.5))
    assert list(model.state_dict()) == list(plain.state_dict())  # names unchanged
    per_channel = parse_normalization("0.1,0.2,0.3,0.5,0.6,0.7", 3)
    assert per_channel.mean == (0.1, 0.2, 0.3) and per_channel.std == (0.5, 0.6, 0.7)
    with pytest.raises(ConfigError, match="above 0"):
        parse_normalization("0.5,0", 3)
    with pytest.raises(ConfigError, match="got 3 numbers"):
        parse_normalization("0.5,0.5,0.5", 3)
    with pytest.raises(ConfigError, match="channels"):
        normalize_input(plain, parse_normalization("0.5,0.5", 1))
    assert infer_input_shape(plain) == (3, 32, 32)


def _write(path: Path, size: tuple[int, int], value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def test_an_image_folder_is_a_dataset_fitted_to_the_model(tmp_path: Path) -> None:
    root = tmp_path / "faces"
    _write(root / "bob" / "1.png", (40, 50), 10)
    _write(root / "alice" / "1.png", (64, 64), 200)
    _write(root / "alice" / "2.png", (64, 64), 100)
    with pytest.raises(DataError, match="different sizes"):
        load_dataset(str(root))
    data = load_dataset(str(root), shape=(3, 32, 32))
    assert len(data) == 3 and data.class_names == ("alice", "bob") and data.shape == (3, 32, 32)
    image, label = data[2]
    assert label == 1 and image.shape == (3, 32, 32)
    assert abs(float(image.mean()) - 10 / 255) < 1e-3
    gray = load_dataset(str(root), shape=(1, 16, 16))
    assert gray[0][0].shape == (1, 16, 16)
    (root / "bob" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png is not a readable image"):
        load_dataset(str(root), shape=(3, 32, 32))
    empty = tmp_path / "empty"
    (empty / "cats").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(str(empty))


def test_mnist_is_fitted_to_a_three_channel_model(data_root: Path) -> None:
    mnist = load_dataset("mnist", data_dir=data_root)
    rgb = load_dataset("mnist", data_dir=data_root, shape=(3, 32, 32))
    image, label = rgb[0]
    assert image.shape == (3, 32, 32) and label == mnist.label(0)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert abs(float(image.mean()) - float(mnist[0][0].mean())) < 0.02


def _momentum_client(data_root: Path, seed: int, n: int, optimizer: ClientOptimizer):
    data = load_dataset("mnist", data_dir=data_root, shape=(3, 32, 32))
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(data), n, replace=False)
    x = torch.stack([data[int(i)][0] for i in picks])
    y = torch.tensor([data.label(int(i)) for i in picks])
    sys.path.insert(0, str(APP))
    try:
        model = build_user_model("qsapp.task:Net", seed=seed)
    finally:
        sys.path.remove(str(APP))
    normalize_input(model, parse_normalization("0.5,0.5", 3))
    update = observe_update(
        model, x, y, local_lr=0.01, epochs=1, local_batch=8, seed=seed, optimizer=optimizer
    )
    return update, np.bincount(y.numpy(), minlength=10)


def test_label_histograms_of_a_momentum_client_count_its_steps(data_root: Path) -> None:
    # 32 examples, 1 epoch of 4 mini-batches, momentum 0.9: step j's gradient counts
    # (1 - 0.9^(4 - j)) / 0.1 times in the update.  Read as plain SGD, the update is taken
    # for a gradient 2.4 times too large and the counts go wrong; read with the momentum's
    # weights, the histogram is close but not exact (the mini-batches count unequally and
    # the server cannot tell which examples shared one).  Plain SGD's is exact here.
    misplaced, naive_misplaced, classes, naive_classes = 0.0, 0.0, 0, 0
    for seed in range(4):
        update, true = _momentum_client(data_root, seed, 32, ClientOptimizer(momentum=0.9))
        read = update_label_counts(update).numpy()
        naive = update_label_counts(replace(update, optimizer=ClientOptimizer())).numpy()
        misplaced += np.abs(read - true).sum() / 2 / 32
        naive_misplaced += np.abs(naive - true).sum() / 2 / 32
        classes += int(np.array_equal(read > 0, true > 0))
        naive_classes += int(np.array_equal(naive > 0, true > 0))
    assert misplaced / 4 <= 0.12 and classes == 4, (misplaced, classes)
    assert naive_misplaced / 4 >= 0.2 and naive_classes <= 1, (naive_misplaced, naive_classes)
    update, true = _momentum_client(data_root, 0, 32, ClientOptimizer())
    assert np.array_equal(update_label_counts(update).numpy(), true)


def test_leakage_audit_records_the_users_model_by_path_and_fingerprint(app_on_path: None) -> None:
    pytest.importorskip("flwr", reason='needs pip install "gradleak[flower]"')
    from gradleak.integrations.flower import model_info

    net = build_user_model("qsapp.task:Net", seed=0)
    info = model_info(net, None, None, None, (0.5, 0.5))
    assert info.name == "qsapp.task:Net" and info.input_shape == (3, 32, 32)
    assert info.num_classes == 10 and info.fingerprint == fingerprint(net)
    assert info.normalize == {"mean": [0.5] * 3, "std": [0.5] * 3}
    from qsapp.task import Net

    assert model_info(Net, None, None, None, None).fingerprint == fingerprint(net)  # a factory
    with pytest.raises(ConfigError, match="not list"):
        model_info([1, 2], None, None, None, None)
    with pytest.raises(ConfigError, match="above 0"):
        model_info(net, None, None, None, ((0.5,) * 3, (0.5, 0.0, 0.5)))
