"""Models people train (convnet, resnet18), their safetensors weights, and `gradleak train`."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradleak.cli import main
from gradleak.data import ImageDataset
from gradleak.data.dataset import array_loader
from gradleak.errors import ConfigError, DataError
from gradleak.experiments.defend.train import split_data
from gradleak.experiments.train.run import TrainRun, run_train, split_indices
from gradleak.models import (
    ConvNet,
    ResNet18,
    build_model,
    load_weights,
    read_metadata,
    save_weights,
)

SHAPES = [((1, 28, 28), 10), ((3, 32, 32), 100)]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _trained(name: str, shape: tuple[int, int, int], classes: int, **options: int) -> nn.Module:
    """A small model after two training steps: its BatchNorm buffers are no longer the init's."""
    model = build_model(name, input_shape=shape, num_classes=classes, seed=1, **options)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(2):
        x = torch.rand(4, *shape, generator=generator)
        y = torch.randint(0, classes, (4,), generator=generator)
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model


@pytest.mark.parametrize("name", ["convnet", "resnet18"])
@pytest.mark.parametrize(("shape", "classes"), SHAPES)
def test_equal_seeds_give_equal_weights(
    name: str, shape: tuple[int, int, int], classes: int
) -> None:
    rng_before = torch.get_rng_state()
    a, b, c = (build_model(name, input_shape=shape, num_classes=classes, seed=s) for s in (3, 3, 4))
    assert torch.equal(torch.get_rng_state(), rng_before)  # no global seeding
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert sa.keys() == sb.keys() == sc.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    weights = [k for k in sa if k.endswith("weight") and sa[k].dim() > 1]
    assert weights and all(not torch.equal(sa[k], sc[k]) for k in weights)


@pytest.mark.parametrize(("shape", "classes"), SHAPES)
def test_convnet_is_the_peers_benchmark_convnet(shape: tuple[int, int, int], classes: int) -> None:
    model = build_model("convnet", input_shape=shape, num_classes=classes, seed=0)
    assert isinstance(model, ConvNet)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 64, 128, 128, 128, 128, 128]
    assert convs[0].in_channels == shape[0]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 8
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 8
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2
    assert not any(isinstance(m, nn.Sigmoid) for m in model.modules())
    assert (model.fc.in_features, model.fc.out_features) == (36 * 32, classes)
    narrow = build_model("convnet", input_shape=shape, num_classes=classes, seed=0, width=8)
    assert narrow.fc.in_features == 36 * 8


def test_resnet18_is_the_cifar_resnet18() -> None:
    model = build_model("resnet18", input_shape=(3, 32, 32), num_classes=10, seed=0)
    assert isinstance(model, ResNet18)
    # 11,173,962 parameters: the usual count of CIFAR-10 ResNet-18.
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert model.stem.kernel_size == (3, 3) and model.stem.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert sum(c.kernel_size == (3, 3) for c in convs) == 17  # stem + 8 blocks x 2
    assert sum(c.kernel_size == (1, 1) for c in convs) == 3  # projection shortcuts
    widths = [stage[0].conv1.out_channels for stage in model.stages]
    assert widths == [64, 128, 256, 512]
    assert [stage[0].conv1.stride for stage in model.stages] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert not any(isinstance(m, nn.Sigmoid) for m in model.modules())
    gray = build_model("resnet18", input_shape=(1, 28, 28), num_classes=100, seed=0)
    assert gray.stem.in_channels == 1 and gray.fc.out_features == 100


@pytest.mark.parametrize("name", ["convnet", "resnet18"])
@pytest.mark.parametrize(("shape", "classes"), SHAPES)
def test_forward_and_backward_shapes(name: str, shape: tuple[int, int, int], classes: int) -> None:
    model = build_model(name, input_shape=shape, num_classes=classes, seed=0, width=8)
    x = torch.rand(3, *shape, requires_grad=True)
    logits = model(x)
    assert logits.shape == (3, classes)
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, classes - 1])).backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for parameter in model.parameters():
        assert parameter.grad is not None and parameter.grad.shape == parameter.shape
        assert torch.isfinite(parameter.grad).all()


def test_width_and_shape_are_checked() -> None:
    with pytest.raises(ConfigError, match="model 'lenet' has no width"):
        build_model("lenet", input_shape=(1, 28, 28), num_classes=10, seed=0, width=8)
    with pytest.raises(ConfigError, match="at least 9x9"):
        build_model("convnet", input_shape=(1, 8, 8), num_classes=10, seed=0)
    with pytest.raises(ConfigError, match="width must be 1 or more"):
        build_model("resnet18", input_shape=(3, 32, 32), num_classes=10, seed=0, width=0)


@pytest.mark.parametrize(
    ("name", "shape", "classes"), [("convnet", (1, 28, 28), 10), ("resnet18", (3, 32, 32), 100)]
)
def test_weights_round_trip_bit_for_bit(
    tmp_path: Path, name: str, shape: tuple[int, int, int], classes: int
) -> None:
    model = _trained(name, shape, classes, width=4)
    saved = _state(model)
    assert any(k.endswith("running_mean") and saved[k].abs().sum() > 0 for k in saved)
    assert any(k.endswith("num_batches_tracked") and int(saved[k]) == 2 for k in saved)
    path = tmp_path / "w.safetensors"
    extra = {"dataset": "mnist", "epochs": 1, "test_accuracy": 0.125, "limit": None}
    save_weights(model, path, extra)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not a temporary file's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # nothing left behind

    fresh = build_model(name, input_shape=shape, num_classes=classes, seed=9, width=4)
    before = _state(fresh)
    assert any(not torch.equal(before[k], saved[k]) for k in saved if "running" in k)
    metadata = load_weights(fresh, path)
    loaded = _state(fresh)
    assert loaded.keys() == saved.keys()
    for key in saved:
        assert loaded[key].dtype == saved[key].dtype, key
        assert torch.equal(loaded[key], saved[key]), key
    assert metadata == read_metadata(path)
    assert metadata["model"] == name and metadata["width"] == 4
    assert metadata["input_shape"] == list(shape) and metadata["num_classes"] == classes
    assert metadata["gradleak_version"] and metadata["epochs"] == 1
    assert metadata["test_accuracy"] == 0.125 and metadata["limit"] is None


def _one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_weights_for_another_model_are_one_config_error(tmp_path: Path) -> None:
    path = tmp_path / "W.safetensors"
    save_weights(build_model("convnet", input_shape=(1, 28, 28), num_classes=10, seed=0), path, {})

    other = build_model("resnet18", input_shape=(1, 28, 28), num_classes=100, seed=0, width=4)
    with pytest.raises(ConfigError) as error:
        load_weights(other, path)
    line = _one_line(error)
    assert "W.safetensors holds a convnet (width 32) for 10 classes" in line
    assert "this run builds a resnet18 (width 4) for 100 classes" in line

    classes = build_model("convnet", input_shape=(1, 28, 28), num_classes=100, seed=0)
    with pytest.raises(ConfigError) as error:
        load_weights(classes, path)
    assert "for 10 classes" in _one_line(error) and "builds a convnet (width 32) for 100" in (
        str(error.value)
    )

    narrower = build_model("convnet", input_shape=(1, 28, 28), num_classes=10, seed=0, width=16)
    with pytest.raises(ConfigError, match=r"this run builds a convnet \(width 16\)"):
        load_weights(narrower, path)
    with pytest.raises(ConfigError, match="on 3x32x32 images"):
        load_weights(build_model("convnet", input_shape=(3, 32, 32), num_classes=10, seed=0), path)
    # A model built without the registry: the tensors' shapes are checked.
    with pytest.raises(ConfigError) as error:
        load_weights(ConvNet((1, 28, 28), 100), path)
    assert "fc.weight is 10x1152 there, 100x1152 here" in _one_line(error)
    with pytest.raises(ConfigError, match="whose tensors do not fit"):
        load_weights(ResNet18((1, 28, 28), 10, width=4), path)


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load / pickle must never be called on a weights file")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)


def test_unreadable_files_are_one_data_error(tmp_path: Path, no_unpickling: None) -> None:
    model = build_model("convnet", input_shape=(1, 28, 28), num_classes=10, seed=0, width=4)
    good = tmp_path / "good.safetensors"
    save_weights(model, good, {})
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    stub = tmp_path / "stub.safetensors"
    stub.write_bytes(data[:5])
    checkpoint = tmp_path / "checkpoint.pt"
    with checkpoint.open("wb") as handle:  # torch.save itself, before torch.load is patched away
        torch.serialization.save(model.state_dict(), handle)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"fc.weight": [0.0]}, protocol=4))
    cases = {
        tmp_path / "absent.safetensors": "not found",
        tmp_path: "is not a file",
        cut: "is cut off or not a safetensors weights file",
        stub: "is cut off or not a safetensors weights file",
        checkpoint: "is a PyTorch pickle (torch.save), not a safetensors file",
        raw: "is a PyTorch pickle",
    }
    before = _state(model)
    for path, expected in cases.items():
        with pytest.raises(DataError) as error:
            load_weights(model, path)
        line = _one_line(error)
        assert str(path) in line and expected in line, line
        with pytest.raises(DataError):
            read_metadata(path)
    assert all(torch.equal(t, before[k]) for k, t in _state(model).items())


def test_save_is_atomic_and_refuses_unknown_models(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must name the model"):
        save_weights(ConvNet((1, 28, 28), 10, width=2), tmp_path / "x.safetensors", {})
    model = build_model("convnet", input_shape=(1, 28, 28), num_classes=10, seed=0, width=2)
    with pytest.raises(ValueError, match="num_classes"):
        save_weights(model, tmp_path / "x.safetensors", {"num_classes": 100})
    with pytest.raises(ConfigError, match="cannot write the weights file"):
        save_weights(model, tmp_path / "absent" / "x.safetensors", {})
    assert list(tmp_path.iterdir()) == []


def test_split_is_defends_split_without_a_limit() -> None:
    images = np.zeros((50, 1, 9, 9), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(50)
    data = ImageDataset(
        "toy", shape=(1, 9, 9), num_classes=10, labels=np.arange(50) % 10,
        loader=array_loader(images),
    )  # fmt: skip
    train, test = split_indices(len(data), 5)
    split = split_data(data, 5)
    assert torch.equal((split.train_x[:, 0, 0, 0] * 255).round().long(), train)
    assert torch.equal((split.eval_x[:, 0, 0, 0] * 255).round().long(), test)
    train, test = split_indices(50, 5, limit=10)
    assert (len(train), len(test)) == (8, 2) and set(train.tolist()).isdisjoint(test.tolist())


TINY = ["--width", "4", "--limit", "500", "--batch-size", "10", "--lr", "0.01"]


def test_train_command_end_to_end_on_mnist(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "weights" / "convnet.safetensors"
    args = ["train", "--model", "convnet", "--dataset", "mnist", "--epochs", "1", *TINY]
    assert main([*args, "--data-dir", str(data_root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    model = build_model("convnet", input_shape=(1, 28, 28), num_classes=10, seed=0, width=4)
    metadata = load_weights(model, out)
    accuracy = metadata["test_accuracy"]
    assert accuracy > 0.2  # chance is 0.1
    summary = [line for line in printed.splitlines() if line.startswith("trained convnet")]
    assert len(summary) == 1, printed
    assert (
        f"test accuracy {100 * accuracy:.2f}% ({metadata['test_correct']} of 100 right)"
        in (summary[0])
    )
    assert "80% of 500 of the 10,000 MNIST test images (400 images" in summary[0]
    assert "only the test split is at hand" in summary[0] and str(out) in summary[0]
    assert metadata["model"] == "convnet" and metadata["width"] == 4
    assert metadata["input_shape"] == [1, 28, 28] and metadata["num_classes"] == 10
    assert metadata["dataset"] == "mnist" and metadata["dataset_split"] == "test"
    assert (metadata["train_images"], metadata["test_images"]) == (400, 100)
    assert metadata["epochs"] == 1 and metadata["steps"] == 40 and metadata["seed"] == 0
    assert metadata["optimizer"] == "Adam" and metadata["lr"] == 0.01
    assert "test split" in metadata["split"] and metadata["gradleak_version"]

    # The stored accuracy is the loaded model's, in eval mode, on the held-out images.
    from gradleak.data import load_dataset

    data = load_dataset("mnist", data_dir=data_root, download=False)
    _, test = split_indices(len(data), 0, limit=500)
    x = torch.stack([data[int(i)][0] for i in test])
    y = torch.tensor(data.labels[test.numpy()])
    model.eval()
    with torch.no_grad():
        assert int((model(x).argmax(1) == y).sum()) == metadata["test_correct"]


def test_training_is_reproducible(tmp_path: Path, data_root: Path) -> None:
    states = []
    for name in ("a", "b"):
        run = TrainRun(
            model="convnet", dataset="mnist", out=str(tmp_path / f"{name}.safetensors"),
            data_dir=str(data_root), width=2, limit=60, batch_size=10, seed=3,
        )  # fmt: skip
        result = run_train(run)
        model = build_model("convnet", input_shape=(1, 28, 28), num_classes=10, seed=0, width=2)
        assert load_weights(model, result.path)["test_accuracy"] == result.accuracy
        states.append(_state(model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_bad_train_input_is_one_line_and_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRADLEAK_NO_DOWNLOAD", "1")
    folder = tmp_path / "folder"
    folder.mkdir()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder\n")
    out = str(tmp_path / "w.safetensors")
    cases = {
        "unknown model": (["--model", "vgg16"], "unknown model 'vgg16'"),
        "unknown dataset": (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        "zero epochs": (["--epochs", "0"], "--epochs"),
        "out is a folder": (["--out", str(folder)], f"--out {folder} is a folder"),
        "out inside a file": (
            ["--out", str(a_file / "w.safetensors")],
            f"is inside the file {a_file}",
        ),
        "width of lenet": (["--model", "lenet", "--width", "8"], "model 'lenet' has no width"),
        "limit of one": (["--limit", "1"], "--limit must be 2 or more"),
        "batch of one": (["--batch-size", "1"], "--batch-size must be 2 or more"),
        "zero lr": (["--lr", "0"], "--lr"),
        "unknown device": (["--device", "tpu"], "unknown device 'tpu'"),
        "missing data": (["--data-dir", str(tmp_path / "absent")], "not found"),
    }
    failures = []
    for case, (args, expected) in cases.items():
        argv = ["train", "--out", out, *args]
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        ok = (
            exit_info.value.code == 2
            and len(lines) == 1
            and lines[0].startswith("gradleak: error: ")
            and expected in lines[0]
        )
        if not ok:
            failures.append(f"{case}: code={exit_info.value.code} stderr={lines!r}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "w.safetensors").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err
