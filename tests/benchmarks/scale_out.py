"""Benchmark (not a test): the disk-backed feature cache on a generated folder whose cache is larger
than the memory limit set, and 1 vs 2 processes (torchrun, gloo) side by side.

`offramp train-exits --head conv` caches every exit's feature map (float16), so a few thousand
32-pixel images make a cache several times the --cache-memory given. Printed per run: wall time,
throughput (images cached and trained per second), the cache's size on disk, and the peak memory
of all the run's processes together: anonymous (private) memory, what a memory limit really
bounds, and the peak resident set, which also counts the cache's file pages the kernel may drop.
Also shows that the in-memory cache is refused at that limit.

    python tests/benchmarks/scale_out.py [--images 2400] [--memory-mib 32] [--epochs 2] [--keep DIR]
"""
import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synth import make_image_folder  # noqa: E402

BIN = Path(sys.executable).parent


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (torchrun's workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return out


def _status(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measured(cmd: list[str]) -> tuple[float, int, int, str]:
    """(seconds, peak anonymous bytes, peak resident bytes, stderr tail) of `cmd`, summed over its processes."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]

    def watch():
        while proc.poll() is None:
            pids = _tree(proc.pid)
            peak[0] = max(peak[0], sum(_status(p, "RssAnon") for p in pids))
            peak[1] = max(peak[1], sum(_status(p, "VmRSS") for p in pids))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    out, err = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-2000:]}\n{err[-3000:]}")
    return time.perf_counter() - t0, peak[0], peak[1], out


def _size(folder: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*.bin"))


def run() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2400)
    p.add_argument("--memory-mib", type=float, default=32.0, help="--cache-memory given to train-exits (MiB)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--keep", help="folder for the data, caches and bundles (default: a temporary one)")
    args = p.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="offramp-scale-"))
    data = root / "data"
    if not data.exists():
        make_image_folder(data, 4, per_class=args.images // 4, seed=0)
    gib = args.memory_mib / 1024
    common = ["train-exits", "--data", str(data), "--backbone", "cifar_resnet_small", "--head", "conv",
              "--epochs", str(args.epochs), "--cache-memory", f"{gib:.6f}"]
    refused = subprocess.run([str(BIN / "offramp"), *common, "--out", str(root / "in-memory.offramp")],
                             env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    print(f"in memory at {args.memory_mib:g} MiB: " + (refused.stderr.strip().splitlines() or ["?"])[-1])
    rows = []
    for n in (1, 2):
        cache = root / f"cache-{n}"
        launcher = [str(BIN / "offramp")] if n == 1 else [str(BIN / "torchrun"), "--standalone",
                                                           "--nproc_per_node", str(n), str(BIN / "offramp")]
        cmd = [*launcher, *common, "--cache-dir", str(cache), "--out", str(root / f"ranks-{n}.offramp")]
        seconds, anon, rss, out = measured(cmd)
        accuracy = [line for line in out.splitlines() if line.startswith("validation accuracy")]
        rows.append((n, seconds, args.images / seconds, _size(cache), anon, rss, accuracy[0] if accuracy else ""))
        again, *_ = measured(cmd)  # a rerun: every chunk is verified and skipped, only the heads train
        rows[-1] += (again,)
    print(f"{args.images} images, conv exit heads, {args.epochs} epochs, --cache-memory {args.memory_mib:g} MiB, "
          f"{os.cpu_count()} cores")
    print(f"{'processes':>9}{'seconds':>9}{'images/s':>10}{'cache on disk':>15}{'peak anon':>11}{'peak RSS':>10}"
          f"{'rerun s':>9}")
    for n, s, ips, size, anon, rss, _acc, again in rows:
        print(f"{n:>9}{s:>9.1f}{ips:>10.1f}{size / 2**20:>11.1f} MiB{anon / 2**20:>7.0f} MiB{rss / 2**20:>6.0f} MiB"
              f"{again:>9.1f}")
    for n, *_rest in rows:
        print(f"{n} process(es): {_rest[5]}")
    print("peak anon: private memory of all the run's processes together (each holds PyTorch itself, "
          "~250 MiB); peak RSS adds the cache's file pages, which the kernel drops under pressure")


if __name__ == "__main__":
    run()
