"""Per-sample arrays on disk, one part per rank (`engine.distributed.part`): what lets a feature
cache or exit records outgrow memory, and a killed run resume.

`PartStore` keeps one rank's part in `<folder>/part-<rank>-of-<world>`: one preallocated raw file
per array, memory-mapped, filled chunk by chunk; after each chunk its bytes are flushed and
`manifest.json` (written atomically) lists it with a CRC-32, so a killed run's rerun verifies the
finished chunks and starts after them. Nothing is ever unpickled: the files are raw arrays
described by JSON. A part is keyed by what it holds (model fingerprint, dataset, this rank's samples),
so a store of another model, other data or another number of ranks is never reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from . import distributed as dist
from .files import json_text, write_atomic

_STORE_FORMAT = "offramp-part-store/2"  # 2: interleaved parts, chunks listed as [start, stop, step]
log = logging.getLogger(__name__)


Arrays = dict[str, torch.Tensor]


class PartStore:
    """This rank's part of per-sample arrays in `folder` (see the module docstring).

    `key`: what the arrays are of (model, data, part); a manifest with another key is stale and its
    files are removed. `fill(chunks, compute)` computes the chunks (ranges of sample indices) not yet
    finished, in order; `compute(chunk)` returns {name: (kept, ...) tensor}, where kept <= the
    chunk's length (unreadable samples dropped; an "index" array says which were kept). `arrays()` returns memory-mapped, read-only tensors
    of every finished row."""

    def __init__(self, folder: str | os.PathLike, key: dict, rows: int):
        self.folder, self.key, self.rows = Path(folder), key, rows
        self.manifest = self._read_manifest()

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "PartStore":
        """Another rank's part, as its manifest describes it (verified). Raises ValueError when
        `folder` holds none: the folder is not on storage every rank shares."""
        try:
            manifest = json.loads((Path(folder) / "manifest.json").read_text())
            key, rows = manifest["key"], int(manifest["rows"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{folder} holds no finished part ({err}); under torchrun the cache folder must be "
                             "on storage every rank can read") from err
        store = cls(folder, key, rows)
        if store.kept != sum(c["kept"] for c in manifest["chunks"]) or len(store.done) != len(manifest["chunks"]):
            raise ValueError(f"{folder} holds a part whose files do not match its manifest; remove the folder "
                             "and run again")
        return store

    # a finished chunk is listed as {"chunk": [start, stop, step], "kept": k, "crc": {name: crc32}}
    @property
    def done(self) -> list[dict]:
        return self.manifest["chunks"]

    @property
    def kept(self) -> int:
        return sum(c["kept"] for c in self.done)

    @property
    def bytes(self) -> int:
        """Bytes the finished rows take on disk."""
        return sum(self.kept * _row_bytes(a) for a in self.manifest["arrays"].values())

    def _read_manifest(self) -> dict:
        fresh = {"format": _STORE_FORMAT, "key": self.key, "rows": self.rows, "arrays": {}, "chunks": [], "info": {}}
        path = self.folder / "manifest.json"
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            manifest = None
        if not (isinstance(manifest, dict) and manifest.get("format") == _STORE_FORMAT
                and manifest.get("key") == self.key and manifest.get("rows") == self.rows):
            if self.folder.exists():  # another model, other data or another split into ranks: start over
                shutil.rmtree(self.folder)
            return fresh
        manifest["chunks"] = self._verified(manifest)
        return manifest

    def _verified(self, manifest: dict) -> list[dict]:
        """The finished chunks whose bytes still match their CRC-32, up to the first that does not."""
        good, start = [], 0
        self.manifest = manifest
        try:
            maps = self._maps("r")
        except (OSError, ValueError):
            return []
        for c in manifest["chunks"]:
            stop = start + c["kept"]
            if any(_crc(m[start:stop]) != c["crc"].get(name) for name, m in maps.items()):
                break
            good.append(c)
            start = stop
        return good

    def _maps(self, mode: str) -> dict[str, np.memmap]:
        out = {}
        for name, a in self.manifest["arrays"].items():
            shape = (self.rows, *a["shape"])
            if self.rows == 0 or 0 in a["shape"]:
                out[name] = np.zeros(shape, dtype=a["dtype"])
            else:
                out[name] = np.memmap(self.folder / f"{name}.bin", dtype=a["dtype"], mode=mode, shape=shape)
        return out

    def fill(self, chunks: list[range], compute: Callable[[range], Arrays],
             on_chunk: Callable[[int], None] | None = None) -> None:
        """Compute and store every chunk after the finished ones; `on_chunk(samples of the part done)`
        after each. Raises ValueError when the finished chunks were cut otherwise (another batch size)."""
        if self.done and [c["chunk"] for c in self.done] != [_bounds(r) for r in chunks[:len(self.done)]]:
            raise ValueError(f"{self.folder} holds chunks of another size (another --batch-size or memory limit); "
                             "remove the folder to cache again")
        done = sum(len(c) for c in chunks[:len(self.done)])
        for chunk in chunks[len(self.done):]:
            arrays = {k: _numpy(v) for k, v in compute(chunk).items()}
            if not self.manifest["arrays"]:
                self._allocate(arrays)
            maps, start = self._maps("r+"), self.kept
            k = len(next(iter(arrays.values())))
            for name, m in maps.items():
                if k:
                    m[start:start + k] = arrays[name]
                if isinstance(m, np.memmap):
                    m.flush()  # the bytes are on disk before the manifest says they are
            self.manifest["chunks"].append({"chunk": _bounds(chunk), "kept": k,
                                            "crc": {name: _crc(m[start:start + k]) for name, m in maps.items()}})
            del maps
            self._write_manifest()
            done += len(chunk)
            if on_chunk is not None:
                on_chunk(done)

    def _allocate(self, arrays: dict[str, np.ndarray]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest["arrays"] = {k: {"dtype": str(v.dtype), "shape": list(v.shape[1:])} for k, v in arrays.items()}
        for name, a in self.manifest["arrays"].items():
            with open(self.folder / f"{name}.bin", "wb") as f:
                f.truncate(self.rows * _row_bytes(a))  # sparse: disk is used as rows are written

    def set_info(self, info: dict) -> None:
        self.manifest["info"] = info
        self._write_manifest()

    def _write_manifest(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.folder / "manifest.json", json_text(self.manifest).encode())

    def arrays(self) -> Arrays:
        """{name: (finished rows, ...) tensor} memory-mapped read-only: pages are read as they are used."""
        out = {}
        with warnings.catch_warnings():  # read-only maps: nothing here ever writes into them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for name, m in self._maps("r").items():
                out[name] = torch.from_numpy(m[:self.kept])
        return out


def _row_bytes(a: dict) -> int:
    return int(np.dtype(a["dtype"]).itemsize * int(np.prod(a["shape"], dtype=np.int64)))


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data) if a.size else 0


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def chunk_progress(progress: Callable | None, stage: str, before: int, total: int,
                   message: Callable[[], str]) -> Callable | None:
    """A progress callback for one chunk that reports the whole part: `before` samples done before
    it, `total` in the part, `message()` (where the part is, how big) as the message."""
    if progress is None:
        return None
    from .progress import Progress
    return lambda p: progress(Progress(stage, before + p.done, total, message()))


def _bounds(r: range) -> list[int]:
    return [r.start, r.stop, r.step]


def chunks(span: range, rows_per_chunk: int) -> list[range]:
    """`span` (a rank's part) cut into consecutive pieces of `rows_per_chunk` samples (the last may
    be shorter)."""
    size = max(int(rows_per_chunk), 1)
    return [span[i:i + size] for i in range(0, len(span), size)]


def part_folders(folder: str | os.PathLike, w: int | None = None) -> Iterator[Path]:
    """The folders `store_folder` gives each rank of `w`, in rank order."""
    w = dist.world() if w is None else w
    for r in range(w):
        yield store_folder(folder, r, w)


def store_folder(folder: str | os.PathLike, r: int | None = None, w: int | None = None) -> Path:
    """Where rank r of w keeps its part under `folder`."""
    r, w = dist.rank() if r is None else r, dist.world() if w is None else w
    return Path(folder) / f"part-{r}-of-{w}"


def open_part(folder: str | os.PathLike, key: dict, rows: int) -> PartStore:
    """This rank's PartStore under `folder`. Parts there made by another number of ranks cannot be
    reused (every rank holds other samples): rank 0 says so in one line and removes them."""
    folder = Path(folder)
    if dist.is_main() and folder.is_dir():
        other = [p for p in folder.iterdir() if (m := re.fullmatch(r"part-\d+-of-(\d+)", p.name))
                 and int(m.group(1)) != dist.world()]
        if other:
            log.warning("%s holds a cache made by %s processes, this run has %d: caching again", folder,
                        " and ".join(sorted({p.name.rsplit("-", 1)[1] for p in other})), dist.world())
            for p in other:
                shutil.rmtree(p, ignore_errors=True)
    return PartStore(store_folder(folder), key, rows)


def fill_part(folder: str | os.PathLike, key: dict, span: range, row_bytes: int, batch_size: int,
              memory_limit: int | None, stage: str, what: str,
              compute: Callable[[range, Callable | None, PartStore], Arrays], progress: Callable | None,
              cancel) -> PartStore:
    """This rank's part `span` under `folder` (`open_part` with `key`, which gets the part's bounds
    and the world size), filled chunk by chunk: `compute(chunk, on_progress)` makes a chunk's arrays,
    each chunk as many whole batches of `row_bytes` per sample as a quarter of the memory limit
    holds (it also gets the store, whose manifest's "info" it may fill). Progress is reported as
    `stage`, its message where the part is (`what` and its size on disk). A rank with no samples
    (fewer than ranks) marks its part empty."""
    from .progress import report
    key = {**key, "part": _bounds(span), "world": dist.world()}
    store = open_part(folder, key, len(span))
    rows = max(batch_size, (default_limit(memory_limit) // 4) // max(row_bytes, 1) // batch_size * batch_size)
    where = lambda: f"{what} {store.folder} ({store.bytes / 2**20:.1f} MiB on disk)"  # noqa: E731
    report(progress, cancel, stage, 0, len(span), where())
    store.fill(chunks(span, rows),
               lambda chunk: compute(chunk, chunk_progress(progress, stage, span.index(chunk.start), len(span), where),
                                     store),
               on_chunk=lambda done: report(progress, cancel, stage, done, len(span), where()))
    if not span:
        store.set_info({})
    return store


def fingerprint(model: torch.nn.Module) -> str:
    """SHA-1 of the model's tensors and exit layout: a cache on disk is reused only for the same model."""
    h = hashlib.sha1(json_text([s.to_json() for s in model.exit_specs]).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def dataset_name(dataset: Dataset) -> str:
    """The dataset's root folder, and which of its items a Subset takes (as a hash)."""
    root = getattr(dataset, "root", None) or getattr(getattr(dataset, "dataset", None), "root", None)
    name = str(root or type(dataset).__name__)
    if isinstance(dataset, Subset):
        name += " items " + hashlib.sha1(np.asarray(dataset.indices, dtype=np.int64).tobytes()).hexdigest()[:16]
    return name


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable), None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every OS reports it
        return None




def default_limit(memory_limit: int | None) -> int:
    """`memory_limit`, or 80 % of the memory available now (8 GiB where unknown)."""
    return memory_limit if memory_limit is not None else int(0.8 * (available_memory() or 2**33))
