"""Benchmark: where the time of a batch-1 staged run goes, at the built-in bundle's operating
points (issue 13's "measured ≥ 0.9 × FLOPs speed-up" target). For each of the bundle's policies,
on the same test images, interleaved in one process, one thread:

  graphs      the plan's stage graphs alone, up to the exit each image leaves at;
  +products   and each exit's pooled sum and products on the host (what the decision reads);
  +decisions  and the decisions, as `PreparedModel.run`'s loop makes them;
  +plan lookup  and finding the policy's plan first (`PreparedModel.plan`: its state key);
  run         `PreparedModel.run` itself: the answer, its StagedOutput's tensors made when first read;
  run + its tensors read  and every tensor of that StagedOutput (what `Engine` does after the clock);

against the full model (`run_to`) and the point's FLOPs speed-up. Then the threshold point with
each early exit that seldom fires switched off: what a search that charged an exit its time
would trade.

    .venv/bin/python tests/benchmarks/loop_parts.py --data ../shared/data/cifar10-jpg.zip [--images 300 --repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine.bundle import default_bundle_path, load_bundle  # noqa: E402
from engine.cost import with_policy_flops  # noqa: E402
from engine.policies import ThresholdPolicy  # noqa: E402
from engine.prepared import prepare  # noqa: E402
from prepared_speed import interleaved_ms, test_images  # noqa: E402


def _parts(form, policy, images, fired):
    """Runners of image i for the loop's parts, cut where image i leaves (`fired[i]`)."""
    plan, last = form.plan(policy), form.num_exits - 1

    def graphs(i):
        x = images[i:i + 1]
        for fn, e, inputs, _products, _s in plan.steps:
            out = fn(x, *inputs) if inputs else fn(x)
            if e == fired[i]:
                return
            x = out[0] if isinstance(out, tuple) else out

    def products(i):
        x = images[i:i + 1]
        for fn, e, inputs, make, _s in plan.steps:
            tap = make(fn(x, *inputs) if inputs else fn(x))[0]
            if e == fired[i]:
                return
            x = tap

    def decisions(i, lookup: bool = False):
        x = images[i:i + 1]
        decide = (form.plan(policy) if lookup else plan).decider.start()
        for fn, e, inputs, make, _s in plan.steps:
            tap, row, more, distance = make(fn(x, *inputs) if inputs else fn(x))
            if e == last or decide(e, row, more, distance, tap):
                return
            x = tap
    return {"graphs": graphs, "+products": products, "+decisions": decisions,
            "+plan lookup": lambda i: decisions(i, lookup=True), "run": lambda i: form.run(images[i:i + 1], policy),
            "run + its tensors read": lambda i: _read(form.run(images[i:i + 1], policy))}


def _read(out) -> None:
    """Every tensor of a StagedOutput: a batch-1 run's are made on first read (`OneImageOutput`)."""
    for name in ("exit_index", "logits", "exit_logits", "ran", "stages_run", "stage_calls"):
        getattr(out, name)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="the CIFAR-10 zip or folder (default: random images)")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    bundle = load_bundle(default_bundle_path(), device="cpu")
    model = bundle.model.eval()
    form, n = prepare(model), model.num_exits
    images = test_images(model, args.data, args.images, seed=1)
    policies = {k: p for k, p in bundle.policies.items() if not p.evaluation_only}
    name, threshold = next((k, p) for k, p in policies.items() if p.kind == "threshold")

    def exits_of(policy) -> list[int]:
        with torch.inference_mode():
            return [int(form.run(images[i:i + 1], policy).exit_index[0]) for i in range(images.shape[0])]
    exits = {k: exits_of(p) for k, p in policies.items()}
    rare = sorted(range(n - 1), key=exits[name].count)[:2]  # the threshold point's exits that fire least
    variants = {}
    for off in ([rare[0]], rare):
        limits = list(threshold.thresholds)
        for e in off:
            limits[e] = None
        variants[f"threshold, E{' and E'.join(map(str, off))} off"] = ThresholdPolicy(limits, threshold.measure)
    exits.update({k: exits_of(p) for k, p in variants.items()})
    runs = {"full": lambda i: form.run_to(images[i:i + 1])}
    for k, p in {**policies, **variants}.items():
        parts = _parts(form, p, images, exits[k]) if k in policies else {"run": lambda i, p=p: form.run(images[i:i + 1], p)}
        runs.update({f"{k}: {part}": fn for part, fn in parts.items()})
    ms = interleaved_ms(runs, images.shape[0], repeats=args.repeats, warmup=1, statistic=min)
    print(f"{images.shape[0]} images, each its fastest of {args.repeats} interleaved runs; full model {ms['full']:.3f} ms")
    for k, p in {**policies, **variants}.items():
        table = with_policy_flops(bundle.cost, p)
        cum = table.cumulative_flops(p.active_exits(n))
        flops = table.full_flops / statistics.fmean(cum[e] for e in exits[k])
        hist = " ".join(str(exits[k].count(e)) for e in range(n))
        parts = " · ".join(f"{part} {ms[name]:.3f}" for name in runs if name.startswith(f"{k}: ")
                           for part in [name[len(k) + 2:]])
        print(f"{k} (exits {hist}): {parts} ms; by its FLOPs {ms['full'] / flops:.3f} ms; "
              f"measured {ms['full'] / ms[f'{k}: run']:.2f}× for {flops:.2f}× by FLOPs "
              f"({ms['full'] / ms[f'{k}: run'] / flops:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
