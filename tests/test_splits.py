"""Splits are pinned: the same data and seed put the same images in the same part, release after
release, so a bundle's calibration and test images stay the ones it was never trained on."""
from __future__ import annotations

import pytest
import torch
from synth import SYNTH_CLASSES, make_image_folder

from engine.backbones import build_backbone
from engine.splits import (UnlabelledSplits, open_splits, recorded_val_fraction, split_indices, spread_indices,
                           spread_subset, stratified_subset, unlabelled_parts)

PRESET = build_backbone("cifar_resnet_small").preset


def test_split_indices_stratified_and_deterministic():
    labels = [0] * 10 + [1] * 20 + [2] * 30
    train, val = split_indices(labels, val_fraction=0.2, seed=3)
    assert sorted(train + val) == list(range(60)) and not set(train) & set(val)
    assert [sum(labels[i] == c for i in val) for c in range(3)] == [2, 4, 6]
    assert split_indices(labels, 0.2, seed=3) == (train, val)
    assert split_indices(labels, 0.2, seed=4) != (train, val)
    assert split_indices(torch.tensor(labels), 0.2, seed=3) == (train, val)
    assert len(split_indices(50, 0.1)[1]) == 5
    assert split_indices(labels, 0.0)[1] == []
    assert len(split_indices([0, 0, 1, 1, 2], 0.01)[1]) == 2  # one per class that has two or more
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(labels, 1.0)


def test_split_indices_are_pinned():
    labels = [i % 3 for i in range(30)]
    assert split_indices(labels, 0.2, seed=0) == (
        [0, 1, 4, 5, 6, 7, 8, 9, 11, 13, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 29],
        [2, 3, 10, 12, 14, 28])
    assert split_indices(labels, 0.1, seed=7)[1] == [4, 11, 15]
    assert split_indices(20, 0.25, seed=0) == ([0, 1, 2, 3, 6, 8, 9, 10, 11, 12, 14, 15, 16, 17, 18],
                                               [4, 5, 7, 13, 19])


def test_folder_calibration_and_test_parts_are_pinned(synthetic_folder):
    s = open_splits(synthetic_folder, PRESET, val_fraction=0.5)
    assert s.calibration.indices == [4, 6, 11, 14, 21, 27, 29, 32, 33, 40, 46, 47, 48, 57, 65, 67, 72, 73, 77, 78,
                                     80, 93, 97, 103, 111, 112, 114, 117]
    assert s.test.indices == [9, 12, 13, 18, 20, 22, 23, 25, 30, 36, 38, 42, 45, 50, 52, 55, 62, 63, 68, 69, 76, 79,
                              86, 89, 91, 92, 98, 99, 106, 109, 115, 119]
    assert stratified_subset(s.train, 10).indices == [5, 28, 41, 58, 71, 82, 94, 102]


def test_split_layout_calibration_part_is_pinned(tmp_path):
    make_image_folder(tmp_path / "train", 3, per_class=20, seed=4)
    make_image_folder(tmp_path / "test", 3, per_class=6, seed=5)
    s = open_splits(tmp_path, PRESET, val_fraction=0.1)
    assert s.calibration.indices == [4, 5, 31, 33, 44, 51] and s.test.indices == list(range(18))


def test_unlabelled_held_out_part_is_pinned(synthetic_folder, tmp_path):
    # class folders: the labelled commands' held-out part, chosen by the class labels
    _, _, held = unlabelled_parts(synthetic_folder, None, val_fraction=0.2)
    assert held == [9, 13, 14, 23, 27, 29, 30, 32, 33, 38, 50, 55, 65, 76, 77, 79, 86, 89, 97, 103, 106, 114, 117, 119]
    # loose photos (a single folder): by count
    photos = make_image_folder(tmp_path / "p", SYNTH_CLASSES[:1], per_class=20, seed=1) / SYNTH_CLASSES[0]
    _, _, held = unlabelled_parts(photos, None, val_fraction=0.25)
    assert held == [4, 5, 7, 13, 19]


def test_unlabelled_splits_are_the_distilled_parts(synthetic_folder):
    s = UnlabelledSplits.open(str(synthetic_folder), None, PRESET, val_fraction=0.2)
    _, train, held = unlabelled_parts(synthetic_folder, None, val_fraction=0.2)
    assert s.train.indices == train and s.calibration.indices == held
    assert s.describe()["calibration"] == 24 and s.describe()["layout"] == "unlabelled"
    assert s.calibration[0][0].shape == (3, 32, 32)  # through the preset's transform


def test_spread_and_recorded_fraction(synthetic_folder):
    assert spread_indices(10, 4) == [0, 2, 4, 6] and spread_indices(3, 5) == [0, 1, 2]
    s = open_splits(synthetic_folder, PRESET, val_fraction=0.5)
    assert spread_subset(s.train, 5).indices == s.train.indices[::12][:5]
    assert recorded_val_fraction({}) == 0.1 and recorded_val_fraction({"split": {"val_fraction": 0.3}}) == 0.3
    assert recorded_val_fraction({"split": {"val_fraction": 0.3}}, 0.2) == 0.2
