"""Whole-network training: learns, checkpoints every epoch, resumes, and can be cancelled."""
import pytest
import torch

from engine.progress import CancelFlag, Cancelled
from engine.preprocess import augment
from engine.train.network import NetworkConfig, train_network


def _data(n=96, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    colours = torch.tensor([[220, 40, 40], [40, 220, 40], [40, 40, 220]], dtype=torch.float32)
    images = colours[labels][:, :, None, None] + 30 * torch.randn(n, 3, 32, 32, generator=g)
    return images.clamp(0, 255).to(torch.uint8), labels


def test_augment_keeps_shape_and_content_range():
    images, _ = _data(8)
    out = augment(images, 4, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)


def test_train_network_learns_and_resumes(tmp_path):
    images, labels = _data()
    cfg = NetworkConfig(arch="cifar_resnet_small", epochs=2, batch_size=32, lr=0.05)
    ckpt = tmp_path / "run.ckpt"
    model, history = train_network(cfg, images, labels, ["r", "g", "b"], checkpoint=ckpt, log=lambda s: None,
                                   val=(images, labels))
    assert len(history) == 2 and ckpt.exists()
    assert history[-1]["val_accuracy"][-1] > 0.6  # colours are easy
    # resuming a finished run does no more epochs and gives the same weights
    again, history2 = train_network(cfg, images, labels, ["r", "g", "b"], checkpoint=ckpt, log=lambda s: None)
    assert history2 == history
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="another configuration"):
        train_network(NetworkConfig(arch="cifar_resnet_small", epochs=3), images, labels, ["r", "g", "b"],
                      checkpoint=ckpt, log=lambda s: None)


def test_cancel_stops_training(tmp_path):
    images, labels = _data()
    flag = CancelFlag()
    flag.set()
    with pytest.raises(Cancelled):
        train_network(NetworkConfig(arch="cifar_resnet_small", epochs=1, batch_size=32), images, labels,
                      ["r", "g", "b"], checkpoint=tmp_path / "c.ckpt", cancel=flag, log=lambda s: None)
    assert not (tmp_path / "c.ckpt").exists()


def test_zero_exit_weights_leave_those_heads_untrained():
    """exit_weights 0,...,0,1 trains the backbone and last exit only (backbone-then-exits recipe)."""
    from engine.train.network import build_network
    images, labels = _data()
    cfg = NetworkConfig(arch="cifar_resnet_small", epochs=1, batch_size=32, lr=0.05, exit_weights=[0, 0, 1])
    torch.manual_seed(cfg.seed)
    untouched = build_network(cfg, ["r", "g", "b"])
    model, _ = train_network(cfg, images, labels, ["r", "g", "b"], log=lambda s: None)
    for e in (0, 1):
        for a, b in zip(model.exits[e].parameters(), untouched.exits[e].parameters()):
            assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(model.exits[2].parameters(), untouched.exits[2].parameters()))
    with pytest.raises(ValueError, match="exit_weights"):
        train_network(NetworkConfig(arch="cifar_resnet_small", epochs=1, exit_weights=[1, 1]), images, labels,
                      ["r", "g", "b"], log=lambda s: None)


def test_joint_training_distils_from_a_teacher_and_starts_from_a_whole_network():
    """Phase B of the built-in recipe: a network whose last exit was trained alone is the starting
    point (its whole state dict) and the teacher; every exit learns labels + the teacher's logits."""
    from engine.train.network import build_network
    images, labels = _data()
    names = ["r", "g", "b"]
    first = NetworkConfig(arch="cifar_resnet_small", epochs=1, batch_size=32, lr=0.05, exit_weights=[0, 0, 1])
    teacher, _ = train_network(first, images, labels, names, log=lambda s: None)
    joint = NetworkConfig(arch="cifar_resnet_small", epochs=4, batch_size=32, lr=0.05, distill=0.5, seed=1)
    start = build_network(joint, names, teacher.state_dict())
    for (k, a), b in zip(start.state_dict().items(), teacher.state_dict().values()):
        assert torch.equal(a, b), k  # the whole network, early heads included, is where it starts
    model, history = train_network(joint, images, labels, names, init=teacher.state_dict(), teacher=teacher,
                                   log=lambda s: None, val=(images, labels))
    assert min(history[-1]["val_accuracy"]) > 0.6
    assert not any(p.requires_grad for p in teacher.parameters())  # the teacher itself is never trained
    with pytest.raises(ValueError, match="no teacher"):
        train_network(joint, images, labels, names, log=lambda s: None)


def test_a_frozen_backbone_keeps_its_weights_and_statistics_while_early_exits_learn():
    """The frozen-backbone comparison of the built-in recipe (DyCE's setting): only early heads change."""
    images, labels = _data()
    names = ["r", "g", "b"]
    first = NetworkConfig(arch="cifar_resnet_small", epochs=1, batch_size=32, lr=0.05, exit_weights=[0, 0, 1])
    base, _ = train_network(first, images, labels, names, log=lambda s: None)
    frozen = NetworkConfig(arch="cifar_resnet_small", epochs=2, batch_size=32, lr=0.05, freeze_backbone=True)
    model, _ = train_network(frozen, images, labels, names, init=base.state_dict(), log=lambda s: None)
    before, after = base.state_dict(), model.state_dict()
    fixed = [k for k in before if k.startswith("backbone.") or k.startswith(f"exits.{model.num_exits - 1}.")]
    assert fixed and all(torch.equal(before[k], after[k]) for k in fixed)  # BatchNorm buffers included
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("exits.0."))
    with pytest.raises(ValueError, match="positive exit weight"):
        train_network(NetworkConfig(arch="cifar_resnet_small", epochs=1, freeze_backbone=True, exit_weights=[0, 0, 1]),
                      images, labels, names, init=base.state_dict(), log=lambda s: None)


def test_a_checkpoint_written_before_a_setting_existed_still_resumes(tmp_path):
    """A setting added later (e.g. freeze_backbone) had its default when the checkpoint was written."""
    import json
    from engine.train.network import read_checkpoint
    images, labels = _data()
    cfg = NetworkConfig(arch="cifar_resnet_small", epochs=1, batch_size=32)
    ckpt = tmp_path / "old.ckpt"
    train_network(cfg, images, labels, ["r", "g", "b"], checkpoint=ckpt, log=lambda s: None)
    state = torch.load(ckpt, weights_only=True)
    config = json.loads(state["config"])
    del config["freeze_backbone"]
    torch.save({**state, "config": json.dumps(config)}, ckpt)
    assert read_checkpoint(ckpt, cfg)["epoch"] == 1
    with pytest.raises(ValueError, match="another configuration"):
        read_checkpoint(ckpt, NetworkConfig(arch="cifar_resnet_small", epochs=1, batch_size=32, freeze_backbone=True))
