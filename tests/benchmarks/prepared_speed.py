"""Benchmark (issue 13): is the staged run as fast as its FLOPs? Every target, hit or miss, for the
built-in model and for mobilenet_v3_large (torchvision, random weights, 10 classes: timing only),
batch 1 and one thread unless said, everything compared interleaved in this one process:

  answers     the prepared run (engine.prepared) gives the eager `MultiExitNet.run`'s exit and logits
              (within 1e-5) on every check image, for every policy, at batch 1 and at batch 64;
  overhead    an active exit that does not fire adds ≤ 25 µs beyond its head's FLOPs (threshold),
              ≤ 40 µs (Bolukbasi, structure): `engine.speed.exit_overhead`, all exits on, per exit;
  onnx        the full model through the staged path within 1.3× of the same bundle's onnxruntime
              export (`offramp export`'s graphs and loop, `OnnxRunner.run_full`);
  flops       measured speed-up ≥ 0.9 × the FLOPs speed-up at every operating point (the bundle's
              policies and its DyCE front; for mobilenet, thresholds that send 20-80 % of the images
              out early), both against the prepared full model;
  batch 64    at every operating point the staged batch-64 run keeps per-sample exits and has at
              least the full model's throughput (both prepared).

Also printed, not targets: where an exit's overhead goes (the full model as one graph, cut into two
graphs at the exit, and with the linear head's products on the host between them), and the
operating points under both runtimes (torch's prepared form and onnxruntime, `--runtime
onnxruntime` in `offramp run` and the app), answers compared, interleaved in one run.

    .venv/bin/python tests/benchmarks/prepared_speed.py --data ../shared/data/cifar10-jpg.zip \
        [--check-images 10000] [--timing-images 300] [--skip-mobilenet | --skip-builtin] [--quantile 0.1 --repeats 5]

Without --data the built-in model is checked on random images (its operating points then mean little).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.backbones import build_backbone  # noqa: E402
from engine.bundle import Bundle, default_bundle_path, load_bundle  # noqa: E402
from engine.cost import measure_costs, with_policy_flops  # noqa: E402
from engine.model import MultiExitNet  # noqa: E402
from engine.policies import BolukbasiPolicy, StructurePolicy, ThresholdPolicy  # noqa: E402
from engine.prepared import _Calibrated, _Segment, prepare  # noqa: E402
from engine.speed import exit_overhead, quantile_of  # noqa: E402

RESULTS: list[tuple[str, bool, str]] = []


def target(name: str, hit: bool, achieved: str) -> None:
    RESULTS.append((name, hit, achieved))
    print(f"[{'HIT ' if hit else 'MISS'}] {name}: {achieved}", flush=True)


QUANTILE = 0.5  # which quantile of each image's repeated times is read (--quantile)
REPEATS = 1  # runs of every image (--repeats)


def interleaved_ms(runs: dict, n: int, *, repeats: int = 1, seed: int = 0, warmup: int = 3,
                   statistic=None) -> dict[str, float]:
    """Per run, the mean over images 0..n−1 of each image's ms (with repeats: the QUANTILE of its
    repeats, or `statistic` of them), all interleaved as `offramp bench` times: each round runs
    every run once on one image, in a shuffled order. The mean over images, not a quantile over
    them: images that exit at different depths cost differently, and an operating point costs their mean."""
    statistic = statistic or _quantile
    names, rng = list(runs), random.Random(seed)
    times: dict[str, list[list[float]]] = {k: [[] for _ in range(n)] for k in names}
    with torch.inference_mode():
        for i in range(min(warmup, n)):
            for k in names:
                runs[k](i)
        for r in range(n * repeats):
            rng.shuffle(names)
            for k in names:
                start = time.perf_counter()
                runs[k](r % n)
                times[k][r % n].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.fmean(statistic(t) for t in per_image) for k, per_image in times.items()}


def _quantile(values: list[float]) -> float:
    return quantile_of(values, QUANTILE)


# -- the checks -------------------------------------------------------------------------------------
def check_answers(label: str, model: MultiExitNet, form, policies: dict, images: torch.Tensor) -> None:
    worst, wrong, total = 0.0, 0, 0
    with torch.inference_mode():
        for name, policy in policies.items():
            for i in range(images.shape[0]):
                a, b = model.run(images[i:i + 1], policy), form.run(images[i:i + 1], policy)
                total += 1
                if int(a.exit_index[0]) != int(b.exit_index[0]) or not torch.equal(a.ran, b.ran):
                    wrong += 1
                    continue
                worst = max(worst, float((a.logits - b.logits).abs().max()))
                ran = a.ran
                worst = max(worst, float((a.exit_logits[ran] - b.exit_logits[ran]).abs().max()))
            for start in range(0, images.shape[0], 64):
                x = images[start:start + 64]
                a, b = model.run(x, policy), form.run(x, policy)
                same = a.exit_index == b.exit_index
                wrong += int((~same).sum())
                total += x.shape[0]
                if same.any():
                    worst = max(worst, float((a.logits[same] - b.logits[same]).abs().max()))
    target(f"{label}: same exit and logits within 1e-5 as the eager run ({len(policies)} policies, batch 1 and 64)",
           wrong == 0 and worst <= 1e-5, f"{wrong} of {total} answers at another exit; largest logit difference "
           f"{worst:.2e}")


def check_overhead(label: str, form, policies: dict, images: torch.Tensor, cost, repeats: int) -> None:
    """The target on variants alternating run by run (`exit_overhead`'s block 1, as measured since
    the target was set), and, printed beside it, in blocks of 20 runs (one policy frame after frame,
    as the app runs it; on the built-in model it has read a few µs higher); and what finding a
    policy's plan costs per frame (`PreparedModel.plan`)."""
    for name, policy in policies.items():
        limit = 25.0 if isinstance(policy, ThresholdPolicy) else 40.0
        o = exit_overhead(form, policy, images, cost, repeats=repeats, quantile=QUANTILE)
        steady = exit_overhead(form, policy, images, cost, repeats=repeats, quantile=QUANTILE, block=20)
        per = " ".join(f"E{e}:{v:.0f}" for e, v in enumerate(o["per_exit_us"]))
        target(f"{label}: an active {name} exit that does not fire adds ≤ {limit:.0f} µs beyond its FLOPs",
               o["mean_us"] <= limit, f"{o['mean_us']:.1f} µs per exit with all on (each added alone: {per} µs); "
               f"in blocks of 20 runs of one policy: {steady['mean_us']:.1f} µs")
        form.plan(policy)
        start, n = time.perf_counter(), 2000
        for _ in range(n):
            form.plan(policy)
        print(f"{label}: finding the {name} policy's plan costs {(time.perf_counter() - start) / n * 1e6:.1f} µs "
              f"a frame", flush=True)


def check_onnx(label: str, bundle: Bundle, form, images: torch.Tensor) -> None:
    from engine.export import OnnxRunner, export_bundle
    folder = Path(tempfile.mkdtemp(prefix="offramp-onnx-")) / "export"
    export_bundle(bundle, folder, check=False)
    runner = OnnxRunner(folder, threads=1)
    n = bundle.model.num_exits
    none = ThresholdPolicy([None] * (n - 1) + [1.0])
    arrays = [images[i:i + 1].numpy() for i in range(images.shape[0])]
    ms = interleaved_ms({"onnx": lambda i: runner.run_full(arrays[i]), "staged": lambda i: form.run(images[i:i + 1], none),
                         "eager": lambda i: bundle.model.run(images[i:i + 1], none)}, images.shape[0], repeats=REPEATS)
    ratio = ms["staged"] / ms["onnx"]
    target(f"{label}: full model through the staged path within 1.3× of onnxruntime", ratio <= 1.3,
           f"{ms['staged']:.3f} ms against {ms['onnx']:.3f} ms ({ratio:.2f}×; eager modules {ms['eager']:.3f} ms)")


def check_points(label: str, model: MultiExitNet, form, cost, points: dict, images: torch.Tensor,
                 batch: torch.Tensor) -> None:
    """Measured against FLOPs speed-up at batch 1, and batch-64 throughput, at every operating point."""
    n_img = images.shape[0]
    runs = {"full": lambda i: form.run_to(images[i:i + 1])}
    flops = {}
    with torch.inference_mode():
        for name, policy in points.items():
            table = with_policy_flops(cost, policy)
            cum = table.cumulative_flops(policy.active_exits(model.num_exits))
            exits = [int(form.run(images[i:i + 1], policy).exit_index[0]) for i in range(n_img)]
            flops[name] = table.full_flops / statistics.fmean(cum[e] for e in exits)
            runs[name] = (lambda p: lambda i: form.run(images[i:i + 1], p))(policy)
    ms = interleaved_ms(runs, n_img, repeats=REPEATS)
    worst = min(points, key=lambda n: (ms["full"] / ms[n]) / flops[n])
    lines = ", ".join(f"{n} {ms['full'] / ms[n]:.2f}/{flops[n]:.2f}" for n in points)
    ratio = (ms["full"] / ms[worst]) / flops[worst]
    target(f"{label}: measured speed-up ≥ 0.9 × FLOPs speed-up at every operating point ({len(points)})",
           ratio >= 0.9, f"worst {worst}: {ratio:.2f} (measured/FLOPs per point: {lines})")
    batched = {"full": lambda i: form.run_to(batch)}
    for name, policy in points.items():
        batched[name] = (lambda p: lambda i: form.run(batch, p))(policy)
    ms64 = interleaved_ms(batched, 1, repeats=5)
    with torch.inference_mode():
        kept = all(torch.equal(form.run(batch, p).exit_index, model.run(batch, p).exit_index) for p in points.values())
    worst64 = max(points, key=lambda n: ms64[n])
    target(f"{label}: batch {batch.shape[0]} keeps per-sample exits and ≥ the full model's throughput at every point",
           kept and ms64[worst64] <= ms64["full"], f"exits {'kept' if kept else 'CHANGED'}; slowest {worst64} "
           f"{batch.shape[0] / ms64[worst64] * 1e3:.0f} images/s against the full model's "
           f"{batch.shape[0] / ms64['full'] * 1e3:.0f}")


def overhead_parts(label: str, form, images: torch.Tensor, repeats: int) -> None:
    """Per early exit (linear heads), where the time an exit that does not fire adds goes: the full
    model as one graph; cut at the exit into two graphs; with the head's products on the host
    between them (`_pooled_products`, what runs; the decision itself is a few Python float operations);
    and, the alternative not kept, with the head (pool + Linear) inside the first graph."""
    n = form.num_exits
    full, _, _ = form.exit_step(n - 1, first=0)
    x = images[:1].contiguous()
    runs, cuts = {"full": lambda i: full(x)}, []
    for e in range(n - 1):
        s = form.exit_stages[e]
        head_fn, _, host = form.exit_step(e, first=0)
        if host is None:
            continue  # a head inside its graph: no host products to tell apart
        rest, _, _ = form.exit_step(n - 1, first=s + 1)
        runs[f"cut{e}"] = (lambda a, b: lambda i: b(a(x)))(head_fn, rest)
        runs[f"host{e}"] = (lambda a, b, h: lambda i: _host_then(a, b, h, x))(head_fn, rest, host)
        inside = form._trace(_Segment(torch.nn.Sequential(*form._graph_stages[:s + 1]),
                                      _Calibrated(form.model.exits[e], float(form.model.temperature[e]),
                                                  (form._taps[s],)), channels_last=True), (x,))
        runs[f"graph{e}"] = (lambda a, b: lambda i: (lambda out: (out[1].tolist(), b(out[0])))(a(x)))(inside, rest)
        cuts.append(e)
    if not cuts:
        return
    ms = interleaved_ms(runs, 1, repeats=repeats)
    parts = ", ".join(f"E{e} {1e3 * (ms[f'cut{e}'] - ms['full']):+.0f} cut, "
                      f"{1e3 * (ms[f'host{e}'] - ms[f'cut{e}']):+.0f} host "
                      f"({1e3 * (ms[f'graph{e}'] - ms[f'cut{e}']):+.0f} in the graph instead)" for e in cuts)
    print(f"{label}: where an exit's overhead goes, µs against the full model's one graph ({ms['full']:.3f} ms): "
          f"{parts}", flush=True)


def _host_then(first, rest, host, x):
    from engine.prepared import _pooled_products
    tap = first(x)
    _pooled_products(tap, *host)
    return rest(tap)


def compare_runtimes(label: str, model: MultiExitNet, points: dict, images: torch.Tensor) -> None:
    """The operating points under torch's prepared form and onnxruntime: same exits, and each
    point's ms and measured speed-up against that runtime's full model, all interleaved."""
    from engine.speed import form_for, plain_runner, staged_runner
    try:
        ort = form_for(model, "onnxruntime")
    except ValueError as err:
        print(f"{label}: onnxruntime not compared ({err})", flush=True)
        return
    torch_form = form_for(model, "prepared")
    with torch.inference_mode():
        differ = sum(int(torch_form.run(images[i:i + 1], p).exit_index[0]) != int(ort.run(images[i:i + 1], p).exit_index[0])
                     for p in points.values() for i in range(images.shape[0]))
    runs = {}
    for rt in ("prepared", "onnxruntime"):
        runs[f"full@{rt}"] = plain_runner(model, -1, images, rt)
        runs.update({f"{n}@{rt}": staged_runner(model, p, images, rt) for n, p in points.items()})
    ms = interleaved_ms(runs, images.shape[0], repeats=REPEATS)
    print(f"{label}: runtimes side by side ({images.shape[0]} images; {differ} answers at another exit):", flush=True)
    for rt, form in (("prepared", torch_form), ("onnxruntime", ort)):
        full = ms[f"full@{rt}"]
        cells = ", ".join(f"{n} {ms[f'{n}@{rt}']:.3f} ms {full / ms[f'{n}@{rt}']:.2f}×" for n in points)
        print(f"  {form.runtime[:40]:<40} full {full:.3f} ms; {cells}", flush=True)


# -- the two models ---------------------------------------------------------------------------------
def test_images(model: MultiExitNet, data: str | None, n: int, seed: int = 0) -> torch.Tensor:
    if data is None:
        crop = model.backbone.preset.crop
        return torch.randn(n, 3, crop, crop, generator=torch.Generator().manual_seed(seed))
    from engine.bench import _images
    from engine.splits import open_splits
    test = open_splits(data, model.backbone.preset).test
    idx = sorted(random.Random(seed).sample(range(len(test)), min(n, len(test))))
    return _images(test, idx)


def default_model(args) -> None:
    bundle = load_bundle(default_bundle_path(), device="cpu")
    model, label = bundle.model.eval(), "built-in cifar_resnet20"
    start = time.perf_counter()
    form = prepare(model)
    print(f"{label}: prepared in {time.perf_counter() - start:.2f} s, runs as {form.runtime}", flush=True)
    check = test_images(model, args.data, args.check_images, seed=1)
    timing = check[:args.timing_images]
    live = {n: p for n, p in bundle.policies.items() if not p.evaluation_only}
    check_answers(label, model, form, live, check)
    kinds = {"threshold": ThresholdPolicy([1.0] * model.num_exits)}
    kinds.update({p.kind: p for p in live.values() if p.kind in ("bolukbasi", "structure")})
    check_overhead(label, form, kinds, timing, bundle.cost, args.overhead_repeats)
    check_onnx(label, bundle, form, timing)
    front = bundle.meta.get("front", [])
    step = max(1, len(front) // 8)
    points = {f"bundle:{n}": p for n, p in live.items()}
    points.update({f"dyce#{i}": ThresholdPolicy.from_json(front[i]["policy"], num_exits=model.num_exits,
                                                          num_classes=model.num_classes)
                   for i in range(0, len(front), step)})
    check_points(label, model, form, bundle.cost, points, timing, check[:64])
    overhead_parts(label, form, timing, args.overhead_repeats)
    compare_runtimes(label, model, {n: p for n, p in points.items() if n.startswith("bundle:")}, timing)


def mobilenet(args) -> None:
    label, classes = "mobilenet_v3_large (random weights)", [f"class{i}" for i in range(10)]
    torch.manual_seed(0)
    model = MultiExitNet.attach(build_backbone("mobilenet_v3_large"), class_names=classes).eval()
    n = model.num_exits
    images = test_images(model, None, args.mobilenet_images, seed=2)
    with torch.inference_mode():
        logits, feats = model.forward_all(images, with_features=True, calibrated=True)
    structure = StructurePolicy([f.shape[1] for f in feats], len(classes))
    structure.set_prototypes(feats, torch.arange(images.shape[0]) % len(classes))
    policies = {"threshold": ThresholdPolicy([0.5] * (n - 1) + [1.0]),
                "bolukbasi": BolukbasiPolicy(n, len(classes)), "structure": structure.eval()}
    cost = measure_costs(model, policies["threshold"])
    start = time.perf_counter()
    form = prepare(model)
    print(f"{label}: prepared in {time.perf_counter() - start:.2f} s, runs as {form.runtime}", flush=True)
    check_answers(label, model, form, policies, images)
    kinds = {"threshold": ThresholdPolicy([1.0] * n), "bolukbasi": policies["bolukbasi"], "structure": structure}
    check_overhead(label, form, kinds, images, cost, args.overhead_repeats)
    check_onnx(label, Bundle(model, policies, "threshold", cost, {"name": "mobilenet_v3_large"}), form,
               images[:args.mobilenet_images // 2])
    conf = torch.softmax(torch.stack(logits, 1), -1).amax(-1)  # (images, exits)
    points = {f"exits {int(100 * q)} %": ThresholdPolicy([float(conf[:, e].quantile(1 - q / (n - 1)))
                                                          for e in range(n - 1)] + [1.0])
              for q in (0.2, 0.5, 0.8)}
    check_points(label, model, form, cost, points, images, images[:64] if images.shape[0] >= 64 else images)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="the CIFAR-10 zip or folder (default: random images)")
    p.add_argument("--check-images", type=int, default=2000, help="test images the answers are compared on")
    p.add_argument("--timing-images", type=int, default=300, help="test images every timed run sees")
    p.add_argument("--overhead-repeats", type=int, default=300, help="runs of each variant for the per-exit overhead")
    p.add_argument("--mobilenet-images", type=int, default=64, help="random 224×224 images for mobilenet_v3_large")
    p.add_argument("--skip-mobilenet", action="store_true")
    p.add_argument("--skip-builtin", action="store_true", help="mobilenet_v3_large only")
    p.add_argument("--quantile", type=float, default=0.5,
                   help="quantile of each run's times that is read (0.5: the median; on a machine shared with busy "
                        "processes e.g. 0.1, which leaves out the runs that waited for a core)")
    p.add_argument("--repeats", type=int, default=1, help="runs of every timed image (the quantile is read over them)")
    args = p.parse_args()
    global QUANTILE, REPEATS
    QUANTILE, REPEATS = args.quantile, max(args.repeats, 1)
    print(f"per image: the {args.quantile:g} quantile of its {REPEATS} interleaved runs (per exit: of the overhead "
          "variants' runs); torch threads 1", flush=True)
    torch.set_num_threads(1)
    if not args.skip_builtin:
        default_model(args)
    if not args.skip_mobilenet:
        mobilenet(args)
    hits = sum(hit for _, hit, _ in RESULTS)
    print(f"\n{hits} of {len(RESULTS)} targets hit")
    for name, hit, achieved in RESULTS:
        print(f"  [{'HIT ' if hit else 'MISS'}] {name}: {achieved}")
    return 0 if hits == len(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
