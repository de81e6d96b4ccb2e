"""`offramp export`: a bundle as ONNX graphs (one per stage, exit and decision) and a manifest."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import args as num
from .common import TerminalProgress, load


def add_export(sub) -> None:
    """The `export` command."""
    raw = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser("export", help="export a bundle to ONNX graphs (one per stage, exit and decision) + manifest",
                       formatter_class=raw, description=EXPORT_HELP)
    s.add_argument("bundle", nargs="?", help="bundle (default: the built-in model)")
    s.add_argument("--out", required=True, metavar="FOLDER", help="folder to write (must not exist, or --overwrite)")
    s.add_argument("--policy", metavar="NAME", help="the bundle's policy to export (default: its default policy)")
    s.add_argument("--images", metavar="PATH", help="check on these images (a folder or zip; its test split if it "
                   "has one) instead of random inputs, and time the exported loop")
    s.add_argument("--check-images", type=num.positive_int, default=64, metavar="N", help="how many images to check on (default 64)")
    s.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier export in FOLDER (only a folder "
                   "holding an export's manifest.json, or an empty one)")
    s.set_defaults(fn=cmd_export)


def cmd_export(args) -> int:
    from ..export import OnnxRunner, check_export_folder, export_bundle
    import torch
    check_export_folder(args.out, overwrite=args.overwrite)  # before the bundle is even loaded
    torch.set_num_threads(1)
    bundle = load(args.bundle)
    inputs = _check_images(args.images, bundle, args.check_images) if args.images else None
    progress = TerminalProgress()
    manifest = export_bundle(bundle, args.out, policy=args.policy, check=not args.no_check, check_inputs=inputs,
                             overwrite=args.overwrite, progress=progress)
    progress.close()
    files = sorted(Path(args.out).iterdir())
    size = sum(f.stat().st_size for f in files)
    pol = manifest["policy"]
    print(f"wrote {len(files)} files ({size / 1e6:.1f} MB) to {args.out}: {len(manifest['stages'])} stages, "
          f"{len(manifest['exits'])} exits, policy {pol['name']!r} ({pol['kind']}) with "
          f"{sum(d is not None for d in pol['decisions'])} decision graphs")
    check = manifest.get("check")
    if check:
        worst = max(check["max_abs_diff"].values())
        print(f"checked with onnxruntime on {check['samples']} {'images' if inputs is not None else 'random inputs'}: "
              f"largest difference from torch {worst:.2g} (stages and exits), the same exit for all "
              f"{check['exits_agree']} (exits taken {check['exit_counts']}), logits within {check['max_logit_diff']:.2g}")
        if inputs is not None:
            runner = OnnxRunner(args.out)
            ms = _mean_ms(lambda x: runner.run(x.numpy()), inputs)
            full = _mean_ms(lambda x: runner.run_full(x.numpy()), inputs)
            ms_again = _mean_ms(lambda x: runner.run(x.numpy()), inputs)  # interleaved: load drifts
            print(f"onnxruntime, batch 1, 1 thread, mean over the {inputs.shape[0]} images: early-exit loop "
                  f"{min(ms, ms_again):.2f} ms, every stage {full:.2f} ms ({full / min(ms, ms_again):.2f}x)")
    return 0


def _check_images(path: str, bundle, limit: int):
    """Up to `limit` preprocessed images from a folder or zip (its test split when it has one), spread over it."""
    from ..data.folders import open_unlabelled
    from ..preprocess import eval_transform
    from ..splits import split_or_whole, spread_indices
    import torch
    transform = eval_transform(bundle.model.backbone.preset)
    images = open_unlabelled(path, split_or_whole(path, "test"), transform=transform)
    return torch.stack([images[i][0] for i in spread_indices(len(images), limit)])


def _mean_ms(fn, inputs) -> float:
    """Mean milliseconds per image of `fn` over `inputs`, one image at a time, after a warm-up image."""
    fn(inputs[:1])
    t = time.perf_counter()
    for i in range(inputs.shape[0]):
        fn(inputs[i:i + 1])
    return (time.perf_counter() - t) * 1e3 / inputs.shape[0]


EXPORT_HELP = """Export a bundle for runtimes outside Offramp (needs onnx, onnxruntime, onnxscript:
pip install 'offramp[export]').

Every stage, every exit head (calibrated) and the policy's decision at every active exit becomes
its own ONNX graph, so a runtime computes only the stages an image needs; manifest.json says how
to preprocess, the order to run them in and when to stop (thresholds are also listed in plain
JSON for threshold policies). Every graph is run with onnxruntime and compared with torch, and the
whole early-exit loop must pick the same exit as the bundle's staged run for every check image.

example:
  offramp export resources/default.offramp --out default-onnx --images cifar10-jpg.zip
"""
