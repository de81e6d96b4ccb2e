"""Side by side with earlyon (issue 16): Offramp and the packaged peer `earlyon` (PyPI, MIT) on one
shared task, each with its own public API and its own calibration, measured the same way.

  backbone     the CIFAR-10 ResNet-56 (option A, 9 stages) with the weights of a fine-tuned checkpoint
               (`--backbone-weights`, default runs/resnet56/phase_a.pt; or `--published` .th), frozen;
  exits        after stages 0..7 for both tools (Offramp: its conv heads, `early_exits_on`; earlyon:
               its MLP heads, `custom_ee` on the same network as a plain nn.Module), the network's
               own classifier last; trained for the same `--epochs` on the train part;
  calibration  each tool's own, on the calibration part (val_fraction 0.2, seed 0), to the same
               accuracy budget: `--max-loss` points below the full model (earlyon: per-head
               temperatures + `calibrate_thresholds`; Offramp: `fit_exits` + DyCE `search_bundle`);
  reported     on the test split: accuracy and loss vs the full model; FLOPs saved by ONE count for
               both (engine/cost.py, torch.utils.flop_counter: the stages up to the exit plus every
               exit head that ran; checked against a FlopCounterMode of real runs); batch-1 latency
               (mean, p50, p95, all runs interleaved in this process, `--threads` threads) and
               batch-64 throughput; the lines of user code each tool needs (the two *_task functions).

earlyon is a benchmark-only tool, not a dependency of Offramp. Install it without touching torch:

    .venv/bin/pip install --no-deps earlyon==0.3.0 click fvcore iopath yacs tabulate termcolor portalocker

Full run (about an hour on a free 2-core CPU), and a quick one:

    .venv/bin/python tests/benchmarks/earlyon_side_by_side.py --data ../shared/data/cifar10-jpg.zip \
        --json runs/earlyon-side-by-side.json
    .venv/bin/python tests/benchmarks/earlyon_side_by_side.py --data ../shared/data/cifar10-jpg.zip \
        --epochs 1 --limit-train 2000 --limit-calibration 1000 --limit-test 1000 --time-images 200
"""
from __future__ import annotations

import argparse
import ast
import copy
import inspect
import random
import statistics
import sys
import textwrap
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from engine.backbones import build_backbone  # noqa: E402
from engine.bench import time_batch1  # noqa: E402
from engine.cost import CostTable, count_flops, with_policy_flops  # noqa: E402
from engine.evaluate import accuracy_per_exit, evaluate_policy, record_outputs  # noqa: E402
from engine.files import write_json  # noqa: E402
from engine.model import MultiExitNet  # noqa: E402
from engine.speed import prepared_form, staged_runner  # noqa: E402
from engine.splits import open_splits, stratified_subset  # noqa: E402
from engine.train.network import NetworkConfig, build_network  # noqa: E402

INSTALL = ("earlyon is not installed; install it without touching torch: .venv/bin/pip install --no-deps "
           "earlyon==0.3.0 click fvcore iopath yacs tabulate termcolor portalocker")
EXIT_STAGES = list(range(8))  # an early exit after each of the first 8 of the 9 stages, for both tools


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- the user code of each tool: what a user writes for the task (counted, printed) ----------------
def offramp_task(network, splits, epochs, max_loss_points):
    from engine.evaluate import record_outputs
    from engine.fronts import search_bundle
    from engine.train.retrain import early_exits_on, fit_exits
    model = early_exits_on(network, exit_stages=list(range(8)), head="conv")
    bundle, _ = fit_exits(model, splits.train, splits.calibration, epochs=epochs)
    records = record_outputs(bundle.model, splits.calibration, with_features=False)
    bundle, _ = search_bundle(bundle, records, max_loss=max_loss_points / 100)
    return bundle


def earlyon_task(plain, splits, epochs, max_loss_points):
    from torch.utils.data import DataLoader
    from earlyon.core.thresholds import calibrate_thresholds
    from earlyon.models import custom_ee
    from earlyon.training import stage2_train_exits
    train = DataLoader(splits.train, batch_size=128, shuffle=True)
    calibration = DataLoader(splits.calibration, batch_size=256)
    model = custom_ee(plain, [f"stages.{s}" for s in range(8)], num_classes=10, input_shape=(1, 3, 32, 32))
    stage2_train_exits(model, train, epochs=epochs)
    calibrate_thresholds(model, calibration, target_accuracy_drop=max_loss_points / 100,
                         fit_temperature=True, temperature_loader=calibration)
    return model.eval()


def user_lines(fn) -> tuple[int, str]:
    """Lines of `fn`'s body that do something (no blank lines, comments or docstring), and its source."""
    source = textwrap.dedent(inspect.getsource(fn))
    body = ast.parse(source).body[0].body
    lines = source.splitlines()[body[0].lineno - 1: body[-1].end_lineno]
    return sum(1 for ln in lines if ln.strip() and not ln.strip().startswith("#")), source


# -- the shared task -------------------------------------------------------------------------------
class PlainNetwork(nn.Module):
    """The trained network as any user holds it: an nn.Module from images to (batch, 10) logits; the
    stages, then the network's own classifier (the last exit), nothing else."""

    def __init__(self, network: MultiExitNet):
        super().__init__()
        self.stages = copy.deepcopy(network.backbone.stages)
        self.classifier = copy.deepcopy(network.exits[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 3, 32, 32) -> (batch, 10)
        for stage in self.stages:
            x = stage(x)
        return self.classifier(x)


def load_network(args, classes: list[str]) -> tuple[MultiExitNet, str]:
    """The fine-tuned ResNet-56 (`--backbone-weights`) or the published one (`--published`), frozen."""
    if args.published:
        from engine.backbones.published import load_published
        backbone = load_published(build_backbone("cifar_resnet56a", stages_per_group=3), args.published)
        net, source = MultiExitNet.attach(backbone, class_names=classes, head="conv"), args.published
    else:
        path = Path(args.backbone_weights)
        if not path.is_file():
            raise SystemExit(f"no checkpoint at {path}: make it with tests/benchmarks/resnet56_default.py "
                             "(phase A), or give --published ../shared/weights/resnet56-4bfd9763.th")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        cfg = NetworkConfig(arch="cifar_resnet56a", head="conv", arch_kwargs={"stages_per_group": 3},
                            exit_weights=[0.0] * 8 + [1.0])
        net, source = build_network(cfg, classes, saved["model"]), str(path)
    if net.exits[-1].spec.kind != "original" or net.num_exits != 9:
        raise SystemExit(f"{source} did not give a 9-stage ResNet-56 with its own classifier as the last exit")
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval(), source


def open_data(args, preset):
    splits = open_splits(args.data, preset, val_fraction=0.2)
    for part, limit in (("train", args.limit_train), ("calibration", args.limit_calibration),
                        ("test", args.limit_test)):
        if limit:
            setattr(splits, part, stratified_subset(getattr(splits, part), limit))
    return splits


# -- one count of FLOPs for both ------------------------------------------------------------------
def earlyon_cost(model) -> CostTable:
    """earlyon's path in Offramp's CostTable, measured on the modules earlyon runs: every stage of
    the wrapped network, its own exit heads on the real taps, the network's classifier last."""
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    stage_flops, taps = [], []
    for stage in model.backbone.stages:
        stage_flops.append(count_flops(stage, x))
        with torch.no_grad():
            x = stage(x)
        taps.append(x)
    heads = [count_flops(model.exit_heads[ep.name].eval(), taps[s])
             for s, ep in zip(EXIT_STAGES, model.config.exit_points)]
    return CostTable(list(range(9)), stage_flops, heads + [count_flops(model.backbone.classifier, taps[-1])])


def measured_flops(fn, x) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn(x)
    return float(counter.get_total_flops())


# -- scoring on the test split ---------------------------------------------------------------------
def score_offramp(bundle, splits) -> dict:
    model, policy = bundle.model, bundle.policies["threshold"]
    cost = with_policy_flops(bundle.cost, policy, model)
    records = record_outputs(model, splits.test, with_features=False)
    ev = evaluate_policy(records, policy, cost)
    return {"accuracy": ev["accuracy"], "full_accuracy": accuracy_per_exit(records)[-1], "flops": ev["mean_flops"],
            "full_flops": cost.full_flops, "exit_fractions": ev["exit_fractions"], "cost": cost, "policy": policy,
            "thresholds": policy.to_json()["thresholds"]}


def score_earlyon(model, cost: CostTable, splits) -> dict:
    from torch.utils.data import DataLoader
    from earlyon.core.thresholds import collect_head_logits, simulate_policy
    cache = collect_head_logits(model, DataLoader(splits.test, batch_size=256), "cpu")
    ev = simulate_policy(cache, model)  # earlyon's exact replay of its router (pinned by its tests)
    chosen = _earlyon_exits(cache, model)
    active = list(model.config.enabled_exits) + [True]
    flops = cost.mean_flops(chosen, active)
    full_acc = (cache.logits[-1].argmax(1) == cache.targets).double().mean().item()
    n = len(EXIT_STAGES)
    return {"accuracy": ev.accuracy, "full_accuracy": full_acc, "flops": flops, "full_flops": cost.full_flops,
            "own_estimate_saved": 1.0 - ev.avg_flops_fraction, "active": active, "chosen": chosen,
            "exit_fractions": torch.bincount(chosen, minlength=n + 1).div(len(chosen)).tolist(),
            "thresholds": [t if on else None for t, on in zip(model.config.confidence_thresholds,
                                                              model.config.enabled_exits)],
            "temperatures": dict(model.config.temperatures), "estimator": model.flops_estimate.method}


def _earlyon_exits(cache, model) -> torch.Tensor:
    """(N,) exit each test image takes under earlyon's router (8 = the last), as simulate_policy decides."""
    from earlyon.core.wrappers import _safe_temperature
    cfg, n = model.config, len(EXIT_STAGES)
    chosen = torch.full((cache.num_samples,), n, dtype=torch.long)
    for e in range(n - 1, -1, -1):
        if cfg.enabled_exits[e]:
            probs = torch.softmax(cache.logits[e] / _safe_temperature(cfg.temperatures[cfg.exit_points[e].name]), -1)
            chosen[probs.max(-1).values.double() >= cfg.confidence_thresholds[e]] = e
    return chosen


# -- speed -----------------------------------------------------------------------------------------
def batch64(runners: dict, images: torch.Tensor, batch: int = 64, seed: int = 0) -> dict:
    """Images per second of every runner over `images` in batches of `batch`, interleaved per batch."""
    starts = list(range(0, images.shape[0] - batch + 1, batch))
    names, rng = list(runners), random.Random(seed)
    spent = dict.fromkeys(names, 0.0)
    outs: dict = {n: [] for n in names}
    with torch.inference_mode():
        for name in names:
            runners[name](images[:batch])  # warm-up
        for s in starts:
            rng.shuffle(names)
            for name in names:
                t0 = time.perf_counter()
                outs[name].append(runners[name](images[s:s + batch]))
                spent[name] += time.perf_counter() - t0
    return {n: {"images_per_s": len(starts) * batch / spent[n], "batches": len(starts), "outputs": outs[n]}
            for n in runners}


def measure_speed(args, off, eo_model, plain, test_images: torch.Tensor) -> dict:
    model, policy = off["bundle"].model, off["score"]["policy"]
    form = prepared_form(model)
    n1 = min(args.time_images, test_images.shape[0])
    runners = {"full": lambda i: plain(test_images[i:i + 1]),
               "offramp": staged_runner(model, policy, test_images, "prepared"),
               "offramp_eager": staged_runner(model, policy, test_images, "eager"),
               "offramp_full": lambda i: form.run_to(test_images[i:i + 1]),
               "earlyon": lambda i: eo_model(test_images[i:i + 1], mode="inference")}
    log(f"batch 1: {n1} test images through {len(runners)} runners, interleaved, {torch.get_num_threads()} thread(s)")
    b1 = time_batch1(runners, n1)
    b64_runners = {"full": plain, "offramp": lambda x: form.run(x, policy),
                   "offramp_eager": lambda x: model.run(x, policy), "offramp_full": lambda x: form.run_to(x),
                   "earlyon": eo_model.forward_inference_batched}
    images64 = test_images[: max(64, args.throughput_images)]
    log(f"batch 64: {images64.shape[0] // 64} batches through {len(b64_runners)} runners, interleaved")
    b64 = batch64(b64_runners, images64)
    return {"batch1": b1, "batch64": b64, "offramp_runtime": form.runtime}


# -- report ----------------------------------------------------------------------------------------
def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cifar10-jpg.zip")
    p.add_argument("--backbone-weights", default="runs/resnet56/phase_a.pt", metavar="FILE",
                   help="torch file {'model': MultiExitNet state dict, 'info': json} (resnet56_default.py phase A)")
    p.add_argument("--published", metavar="FILE", help="instead: the published resnet56-4bfd9763.th")
    p.add_argument("--epochs", type=int, default=2, help="head-training epochs, the same for both tools")
    p.add_argument("--max-loss", type=float, default=1.0, help="accuracy budget: points below the full model")
    p.add_argument("--limit-train", type=int, default=0, metavar="N")
    p.add_argument("--limit-calibration", type=int, default=0, metavar="N")
    p.add_argument("--limit-test", type=int, default=0, metavar="N")
    p.add_argument("--time-images", type=int, default=1000, help="test images timed at batch 1")
    p.add_argument("--throughput-images", type=int, default=2048, help="test images timed at batch 64")
    p.add_argument("--flop-check-images", type=int, default=20, help="images whose real runs are counted too")
    p.add_argument("--threads", type=int, default=1, help="torch threads while timing (both tools)")
    p.add_argument("--json", help="write every figure here")
    args = p.parse_args()
    if args.limit_test and args.limit_test < 64:
        raise SystemExit(f"--limit-test {args.limit_test} leaves no batch of 64 to time; give at least 64")
    try:
        import earlyon
    except ImportError:
        raise SystemExit(INSTALL) from None
    torch.manual_seed(0)
    t_start = time.perf_counter()

    preset = build_backbone("cifar_resnet56a", stages_per_group=3).preset
    splits = open_data(args, preset)
    network, source = load_network(args, splits.classes)
    log(f"backbone {source}; train {len(splits.train)}, calibration {len(splits.calibration)}, "
        f"test {len(splits.test)} images; {args.epochs} epoch(s); budget {args.max_loss:g} point(s)")

    log("Offramp: conv exits on the frozen network, fit_exits, DyCE search")
    t0 = time.perf_counter()
    bundle = offramp_task(network, splits, args.epochs, args.max_loss)
    off_s = time.perf_counter() - t0
    log(f"earlyon {earlyon.__version__}: custom_ee, stage2_train_exits, calibrate_thresholds")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    eo_model = earlyon_task(PlainNetwork(network), splits, args.epochs, args.max_loss)
    eo_s = time.perf_counter() - t0

    log("scoring both on the test split")
    off = {"bundle": bundle, "score": score_offramp(bundle, splits)}
    eo_cost = earlyon_cost(eo_model)
    eo = score_earlyon(eo_model, eo_cost, splits)
    plain = PlainNetwork(network).eval()

    n_images = min(max(args.time_images, args.throughput_images), len(splits.test))
    items = [splits.test[i] for i in range(n_images)]
    test_images, test_labels = torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])
    flop_check = check_counts(args, off, eo, eo_model, eo_cost, test_images)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        speed = measure_speed(args, off, eo_model, plain, test_images)
    finally:
        torch.set_num_threads(threads_before)
    report = build_report(args, source, splits, off, eo, eo_cost, speed, flop_check, test_labels, off_s, eo_s)
    print_report(report)
    if args.json:
        write_json(args.json, report)
        log(f"wrote {args.json}")
    log(f"done in {time.perf_counter() - t_start:.0f} s")
    return 0


def check_counts(args, off, eo, eo_model, eo_cost, images) -> dict:
    """FlopCounterMode around real runs of a few images against the common count of the exit each took."""
    model, policy, cost = off["bundle"].model, off["score"]["policy"], off["score"]["cost"]
    active = policy.active_exits(model.num_exits)
    off_table, eo_table = cost.cumulative_flops(active), eo_cost.cumulative_flops(eo["active"])
    worst, agree = 0.0, 0
    n = min(args.flop_check_images, images.shape[0])
    for i in range(n):
        x = images[i:i + 1]
        out = model.run(x, policy)
        got = measured_flops(lambda t: model.run(t, policy), x)
        worst = max(worst, abs(got - off_table[int(out.exit_index[0])]) / cost.full_flops)
        res = eo_model(x, mode="inference")
        e = res.exit_taken if res.exit_taken >= 0 else len(EXIT_STAGES)
        agree += int(e == int(eo["chosen"][i]))
        got = measured_flops(lambda t: eo_model(t, mode="inference"), x)
        worst = max(worst, abs(got - eo_table[e]) / cost.full_flops)
    return {"images": n, "largest_difference_of_full": worst, "earlyon_router_agrees_with_replay": agree}


def batch64_figures(name: str, out: list, labels: torch.Tensor, table: list[float], full_flops: float) -> dict:
    """Accuracy and FLOPs saved of one runner's batch-64 outputs (what each tool answers in a batch)."""
    preds, flops = [], []
    for o in out:
        if name == "earlyon":  # one exit for the whole batch: the earliest that every image clears
            e = o.exit_taken if o.exit_taken >= 0 else len(table) - 1
            preds.append(o.predictions.argmax(1))
            flops += [table[e]] * o.predictions.shape[0]
        else:
            preds.append(o.logits.argmax(1))
            flops += [table[int(e)] for e in o.exit_index]
    pred = torch.cat(preds)
    return {"accuracy": (pred == labels[: pred.numel()]).double().mean().item(),
            "saved": 1.0 - statistics.fmean(flops) / full_flops}


def build_report(args, source, splits, off, eo, eo_cost, speed, flop_check, labels, off_s, eo_s) -> dict:
    so, b1, b64 = off["score"], speed["batch1"], speed["batch64"]
    full_ms, full_ips = b1["full"]["mean_ms"], b64["full"]["images_per_s"]
    cost = so["cost"]
    tables = {"offramp": cost.cumulative_flops(so["policy"].active_exits(9)),
              "earlyon": eo_cost.cumulative_flops(eo["active"])}

    def speed_of(key: str) -> dict:
        t = b1[key]
        return {"batch1_mean_ms": t["mean_ms"], "batch1_p50_ms": t["p50_ms"], "batch1_p95_ms": t["p95_ms"],
                "batch1_p99_ms": t["p99_ms"], "batch1_speedup": full_ms / t["mean_ms"],
                "batch64_images_per_s": b64[key]["images_per_s"],
                "batch64_speedup": b64[key]["images_per_s"] / full_ips}

    methods = {"full": {"accuracy": so["full_accuracy"], "loss_points": 0.0, "saved": 0.0, **speed_of("full"),
                        "runtime": "torch eager, the plain network"}}
    for key, s, task, secs in (("offramp", so, offramp_task, off_s), ("earlyon", eo, earlyon_task, eo_s)):
        lines, _ = user_lines(task)
        methods[key] = {"accuracy": s["accuracy"], "full_accuracy": s["full_accuracy"],
                        "loss_points": 100 * (s["full_accuracy"] - s["accuracy"]),
                        "saved": 1.0 - s["flops"] / s["full_flops"], "mean_flops": s["flops"],
                        "exit_fractions": s["exit_fractions"], "thresholds": s["thresholds"], **speed_of(key),
                        "batch64": batch64_figures(key, b64[key]["outputs"], labels, tables[key], cost.full_flops),
                        "user_code_lines": lines, "task_seconds": round(secs, 1)}
    full64 = torch.cat([o.argmax(1) for o in b64["full"]["outputs"]])
    methods["full"]["batch64"] = {"accuracy": (full64 == labels[: full64.numel()]).double().mean().item(),
                                  "saved": 0.0, "images": int(full64.numel())}
    methods["offramp"]["runtime"] = speed["offramp_runtime"]
    methods["earlyon"].update(runtime="torch eager, forward hooks (earlyon's EarlyExitWrapper)",
                              own_estimate_saved=eo["own_estimate_saved"], estimator=eo["estimator"],
                              temperatures=eo["temperatures"])
    methods["offramp_full"] = {**speed_of("offramp_full"), "runtime": speed["offramp_runtime"] + ", full model"}
    methods["offramp_eager"] = {**speed_of("offramp_eager"), "runtime": "torch eager, MultiExitNet.run"}
    import earlyon
    return {"task": {"backbone": "cifar_resnet56a (stages_per_group 3, 9 stages)", "weights": source,
                     "exit_stages": EXIT_STAGES, "epochs": args.epochs, "max_loss_points": args.max_loss,
                     "data": args.data, "split": splits.describe(), "earlyon_version": earlyon.__version__,
                     "threads": args.threads, "command": " ".join(sys.argv)},
            "flops": {"full_flops": cost.full_flops, "stage_flops": cost.stage_flops,
                      "offramp_exit_flops": cost.exit_flops, "earlyon_exit_flops": eo_cost.exit_flops,
                      "how": "torch.utils.flop_counter (a multiply-add counts 2): stages up to the exit taken plus "
                             "every exit head that ran, for both tools", "check": flop_check},
            "methods": methods,
            "batch1_images": b1["full"]["images"], "batch64_batches": b64["full"]["batches"]}


def print_report(r: dict) -> None:
    m, t = r["methods"], r["task"]
    print(f"\nCIFAR-10 test split ({r['task']['split']['test']} images), ResNet-56 frozen, exits after stages 0-7, "
          f"{t['epochs']} epoch(s) of head training, each tool calibrated to {t['max_loss_points']:g} point(s) "
          f"below the full model; {t['threads']} thread(s)")
    head = (f"{'method':<10} {'test acc':>8} {'loss':>6} {'FLOPs saved':>11} {'b1 mean':>8} {'p50':>7} {'p95':>7} "
            f"{'b1 x':>5} {'b64 img/s':>9} {'b64 x':>5} {'user lines':>10}")
    print(head + "\n" + "-" * len(head))
    for key, label in (("full", "full model"), ("offramp", "Offramp"), ("earlyon", "earlyon")):
        v = m[key]
        lines = str(v.get("user_code_lines", "—"))
        loss = "—" if key == "full" else f"{v['loss_points']:.2f}"
        print(f"{label:<10} {pct(v['accuracy']):>8} {loss:>6} {pct(v['saved']):>11} {v['batch1_mean_ms']:>6.2f}ms "
              f"{v['batch1_p50_ms']:>7.2f} {v['batch1_p95_ms']:>7.2f} {v['batch1_speedup']:>5.2f} "
              f"{v['batch64_images_per_s']:>9.0f} {v['batch64_speedup']:>5.2f} {lines:>10}")
    print(f"(loss in points of accuracy; FLOPs saved by one count, {r['flops']['how']}; x = speed-up over the full "
          f"model, the plain network in torch eager; {r['batch1_images']} images at batch 1, "
          f"{r['batch64_batches']} batches of 64)")
    o, e = m["offramp"], m["earlyon"]
    print(f"Offramp runtime: {o['runtime']}; its own full model {m['offramp_full']['batch1_mean_ms']:.2f} ms, "
          f"{m['offramp_full']['batch64_images_per_s']:.0f} img/s; Offramp's policy in eager torch (MultiExitNet.run) "
          f"{m['offramp_eager']['batch1_mean_ms']:.2f} ms, {m['offramp_eager']['batch64_images_per_s']:.0f} img/s")
    print(f"earlyon runtime: {e['runtime']}; its own FLOPs estimate ({e['estimator']}, heads left out) says "
          f"{pct(e['own_estimate_saved'])} saved")
    print(f"at batch 64, on the first {m['full']['batch64']['images']} test images (full model "
          f"{pct(m['full']['batch64']['accuracy'])} there): Offramp {pct(o['batch64']['accuracy'])} accuracy, {pct(o['batch64']['saved'])} saved "
          f"(per-image exits); earlyon {pct(e['batch64']['accuracy'])}, {pct(e['batch64']['saved'])} saved "
          f"(the whole batch leaves at the earliest exit every image clears)")
    print("exits taken (fraction of test images, E0..E8): Offramp "
          + " ".join(f"{x:.2f}" for x in o["exit_fractions"]) + "; earlyon "
          + " ".join(f"{x:.2f}" for x in e["exit_fractions"]))
    ck = r["flops"]["check"]
    print(f"FLOP count check: real runs of {ck['images']} images under FlopCounterMode differ from the common count "
          f"by at most {100 * ck['largest_difference_of_full']:.3f} % of the full model; earlyon's router took the "
          f"replayed exit on {ck['earlyon_router_agrees_with_replay']}/{ck['images']}")
    print(f"time for the task: Offramp {o['task_seconds']:.0f} s, earlyon {e['task_seconds']:.0f} s")
    for task in (offramp_task, earlyon_task):
        n, src = user_lines(task)
        print(f"\n{n} lines of user code:\n{src.rstrip()}")


if __name__ == "__main__":
    sys.exit(main())
