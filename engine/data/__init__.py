"""Labelled and unlabelled images where they lie: class folders (torchvision's ImageFolder
layout), the CIFAR-10 JPEG zip read in place, and checks that report bad files instead of crashing.

  layout   where the images are: a folder or a zip member prefix, its splits and class folders
  zips     one zip member's bytes, read in place and bounded in size
  folders  the datasets (`open_dataset`, `open_unlabelled`) and the loaders that batch them
  checks   `check_folder`, `check_unlabelled`: what is usable, every bad file named with its reason

Splitting a dataset into train, calibration and test parts is `engine.splits`; turning an image
into a tensor is `engine.preprocess`; decoding one is `engine.images`.
"""
