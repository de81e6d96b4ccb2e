"""The option-A CIFAR ResNets and the published-checkpoint loader, checked against an independent
implementation of the published network (written here from its description), without ../shared."""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.backbones import build_backbone
from engine.backbones.published import CheckpointError, load_published, sha256_of


# -- the published network, as its README describes it (akamaster/pytorch_resnet_cifar10) ---------
class _Block(nn.Module):
    def __init__(self, c_in, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.down = stride != 1 or c_in != planes
        self.planes = planes

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.down:
            short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.planes // 4, self.planes // 4))
        return F.relu(out + short)


class _Reference(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        c = 16
        for g, planes in enumerate((16, 32, 64)):
            blocks = []
            for i in range(n):
                blocks.append(_Block(c, planes, 2 if (g > 0 and i == 0) else 1))
                c = planes
            setattr(self, f"layer{g + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name
                        else torch.randn(t.shape, generator=g) * 0.2)
    return model.eval()


def _published_file(tmp_path, depth: int, seed: int = 0, **extra):
    ref = _randomised(_Reference((depth - 2) // 6), seed)
    # as published: saved from DataParallel (module. prefixes), without BatchNorm's step counters
    state = {f"module.{k}": v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / f"resnet{depth}.th"
    torch.save({"best_prec1": 91.0, "state_dict": state, **extra}, path)
    return ref, path


def _backbone_logits(backbone, x):
    for stage in backbone.stages:
        x = stage(x)
    return backbone.classifier(x)


@pytest.mark.parametrize("depth", [20, 32])
def test_loaded_backbone_computes_what_the_published_network_computes(tmp_path, depth):
    ref, path = _published_file(tmp_path, depth, seed=depth)
    backbone = load_published(build_backbone(f"cifar_resnet{depth}a"), path, sha256=sha256_of(path)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(_backbone_logits(backbone, x), ref(x), atol=1e-5)


def test_option_a_backbones_declare_what_they_produce():
    for name, stages in (("cifar_resnet20a", 9), ("cifar_resnet56a", 9)):
        backbone = build_backbone(name).eval()
        assert backbone.num_stages == stages
        assert backbone.preset.mean == (0.485, 0.456, 0.406)  # the normalisation the weights expect
        x = torch.randn(1, 3, 32, 32)
        for stage, tap in zip(backbone.stages, backbone.taps):
            x = stage(x)
            assert x.shape[1] == tap.channels and 32 // x.shape[-1] == tap.stride
        # shortcuts have no parameters: as many as the published network
        n = (int(name[len("cifar_resnet"):-1]) - 2) // 6
        ours = sum(p.numel() for p in backbone.parameters())
        assert ours == sum(p.numel() for p in _Reference(n).parameters())
    assert build_backbone("cifar_resnet56a", stages_per_group=9).num_stages == 27
    assert build_backbone("cifar_resnet56a", stages_per_group=9).spec["kwargs"]["stages_per_group"] == 9
    with pytest.raises(ValueError, match="stages_per_group"):
        build_backbone("cifar_resnet20a", stages_per_group=4)


def test_bad_checkpoints_are_refused_in_one_sentence(tmp_path):
    _, path20 = _published_file(tmp_path, 20)
    cases = {}
    cases["another depth"] = (lambda: load_published(build_backbone("cifar_resnet32a"), path20), "does not fit")
    cases["wrong sha"] = (lambda: load_published(build_backbone("cifar_resnet20a"), path20, sha256="0" * 64),
                          "SHA-256")
    empty = tmp_path / "empty.th"
    empty.write_bytes(b"")
    cases["empty"] = (lambda: load_published(build_backbone("cifar_resnet20a"), empty), "cannot be read")
    hostile = tmp_path / "hostile.th"
    hostile.write_bytes(pickle.dumps(_Reference))  # a class: weights_only refuses to rebuild it
    cases["hostile"] = (lambda: load_published(build_backbone("cifar_resnet20a"), hostile), "cannot be read")
    missing = tmp_path / "nowhere.th"
    cases["missing"] = (lambda: load_published(build_backbone("cifar_resnet20a"), missing), "does not exist")
    notensors = tmp_path / "notensors.th"
    torch.save({"state_dict": {}}, notensors)
    cases["no tensors"] = (lambda: load_published(build_backbone("cifar_resnet20a"), notensors), "no state dict")
    (tmp_path / "other").mkdir()
    _, shapes = _published_file(tmp_path / "other", 20)
    state = torch.load(shapes, weights_only=True)
    state["state_dict"]["module.linear.weight"] = torch.zeros(7, 64)
    torch.save(state, shapes)
    cases["shapes"] = (lambda: load_published(build_backbone("cifar_resnet20a"), shapes), "shapes differ")
    nan = tmp_path / "nan.th"
    state["state_dict"]["module.linear.weight"] = torch.full((10, 64), float("nan"))
    torch.save(state, nan)
    cases["nan"] = (lambda: load_published(build_backbone("cifar_resnet20a"), nan), "NaN")
    for case, (load, words) in cases.items():
        with pytest.raises(CheckpointError) as err:
            load()
        message = str(err.value)
        assert words in message and "\n" not in message, (case, message)


# -- offramp train-backbone --init: a run that starts from the published weights ----------------------
@pytest.fixture(scope="module")
def ten_classes(tmp_path_factory):
    """CIFAR-10's shape in miniature: 10 classes × 4 images (32×32), as the published classifier needs."""
    from synth import make_image_folder
    return make_image_folder(tmp_path_factory.mktemp("ten"), [f"c{i}" for i in range(10)], per_class=4, seed=1)


def test_train_backbone_starts_from_the_init_checkpoint(tmp_path, ten_classes, capsys):
    from engine.backbones.published import published_key_map
    from engine.bundle import load_bundle
    from engine.cli import main
    ref, path = _published_file(tmp_path, 20, seed=3)
    out = tmp_path / "b.offramp"
    # a learning rate of 1e-9: one epoch moves no weight measurably, so the bundle holds the starting weights
    assert main(["train-backbone", "--arch", "cifar_resnet20a", "--data", str(ten_classes), "--init", str(path),
                 "--init-sha256", sha256_of(path).upper(), "--epochs", "1", "--lr", "1e-9", "--batch-size", "16",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    model = load_bundle(out).model
    ours, theirs = model.backbone.state_dict(), ref.state_dict()
    stages = {k: v for k, v in published_key_map(build_backbone("cifar_resnet20a")).items() if k in theirs
              and "running_" not in k and "num_batches" not in k}  # BatchNorm statistics follow training batches
    assert len(stages) > 50
    for key, name in stages.items():
        if name.startswith("classifier."):  # the published classifier became the last exit
            continue
        assert torch.allclose(ours[name], theirs[key], atol=1e-6), key
    last = [m for m in model.exits[-1].modules() if isinstance(m, nn.Linear)]
    assert len(last) == 1 and torch.allclose(last[0].weight, ref.linear.weight, atol=1e-6)
    bundle = load_bundle(out)
    init = bundle.meta["training"]["init"]
    assert init["sha256"] == sha256_of(path) and init["file"] == str(path) and init["classes"] == 10


@pytest.mark.parametrize("case", ["wrong sha", "another depth", "conv shortcuts", "other family", "sha without init",
                                  "classes", "hostile"])
def test_train_backbone_refuses_an_init_that_does_not_fit_before_decoding(case, tmp_path, ten_classes,
                                                                          synthetic_folder, monkeypatch, capsys):
    import engine.train.network as network
    from engine.cli import main

    def no_decoding(*a, **k):
        raise AssertionError("images were decoded before the --init file was refused")

    monkeypatch.setattr(network, "decode_dataset", no_decoding)
    _, path20 = _published_file(tmp_path, 20)
    hostile = tmp_path / "hostile.th"
    hostile.write_bytes(pickle.dumps(_Reference))
    arch, data, extra, words = "cifar_resnet20a", ten_classes, ["--init", str(path20)], str(path20)
    if case == "wrong sha":
        extra += ["--init-sha256", "0" * 64]
        words = "SHA-256"
    elif case == "another depth":
        arch = "cifar_resnet32a"
        words = "does not fit cifar_resnet32a"
    elif case == "conv shortcuts":
        arch = "cifar_resnet20"
        words = "no weights for"
    elif case == "other family":
        arch = "resnet18"
        words = "give --arch cifar_resnet20a"
    elif case == "sha without init":
        extra = ["--init-sha256", sha256_of(path20)]
        words = "give --init FILE"
    elif case == "classes":
        data = synthetic_folder  # 4 classes: the published classifier has 10
        words = "classifies 10 classes"
    else:
        extra = ["--init", str(hostile)]
        words = "is not a PyTorch checkpoint of plain tensors"
    out = tmp_path / "n.offramp"
    assert main(["train-backbone", "--arch", arch, "--data", str(data), "--epochs", "1", *extra,
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("offramp train-backbone: ") and words in err, err
    assert "weights_only=False" not in err  # torch's advice would run the file's code
    assert not out.exists() and not out.with_suffix(".ckpt").exists()


def test_a_malformed_init_sha256_is_refused_by_the_parser(capsys):
    from engine.cli import main
    with pytest.raises(SystemExit) as stop:
        main(["train-backbone", "--data", "d", "--out", "o.offramp", "--init", "f.th", "--init-sha256", "abc"])
    assert stop.value.code == 2 and "is not a SHA-256 digest" in capsys.readouterr().err
