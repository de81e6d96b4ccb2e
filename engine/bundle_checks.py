"""What a bundle must satisfy before Offramp believes it: bounded sizes, sane numbers, intact weights.

A bundle is a file from anywhere. Before anything is built, its header and manifest are checked
against fixed limits (a small file must never make Offramp allocate gigabytes) and every number the
manifest declares is checked for type, range and finiteness. The model is then built with its large
tensors on the "meta" device (no memory), its tensor shapes compared with the file's header, and
only then are the weights read, compared with their checksum and checked for NaN, ±inf and
non-positive temperatures. Every refusal is a BundleError naming the file.
"""
from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

MAX_HEADER_BYTES = 16 * 2**20  # safetensors header: the manifest plus one small entry per tensor
MAX_MANIFEST_BYTES = 8 * 2**20  # the built-in model's is 75 kB
MAX_DEPTH = 64  # JSON nesting; the built-in model's is 7
MAX_CLASSES = 100_000
MAX_NAME_CHARS = 1_000
MAX_EXITS = 256
MAX_POLICIES = 64
MAX_IMAGE_SIDE = 4096  # preset crop and resize: every frame is resized to this
MAX_COST_ENTRIES = 4096
SMALL_TENSOR = 1 << 16  # elements: tensors up to this size are made for real while a model is built
CHECKSUM_KEY = "tensors_sha256"
HEAD_KINDS = ("linear", "conv", "deep", "original")


class BundleError(ValueError):
    """A bundle file is missing, damaged, or not one this version of Offramp can read."""


def class_name_problem(name: str) -> str | None:
    """Why `name` cannot be a class name, else None: empty or only spaces, longer than
    MAX_NAME_CHARS, or holding a control character (a newline splits every line `offramp run`
    prints; an escape sequence reaches the terminal) or half of a surrogate pair (not text: it cannot
    be printed or written as UTF-8). The same rule for a bundle's manifest and for the class folders
    training reads, so a folder cannot make a bundle that is refused later."""
    if not name.strip():
        return "it is empty"
    if len(name) > MAX_NAME_CHARS:
        return f"it is longer than {MAX_NAME_CHARS} characters"
    for ch in name:
        kind = unicodedata.category(ch)
        if kind == "Cc":
            return f"it holds the control character {ch!r}"
        if kind == "Cs":
            return f"it holds {ch!r}, half of a surrogate pair, which is not text"
    return None


# -- the file's header and manifest ---------------------------------------------------------------
def check_header_length(path: Path) -> None:
    """Refuse a safetensors header that is longer than the file or than MAX_HEADER_BYTES, reading 8 bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise BundleError(f"{path} is not a valid bundle: not a readable safetensors file ({size} bytes)")
    n = int.from_bytes(head, "little")
    if n > size - 8:
        raise BundleError(f"{path} is not a valid bundle: not a readable safetensors file (truncated, or not a "
                          f"bundle at all: its first bytes announce a header longer than its {size} bytes)")
    if n > MAX_HEADER_BYTES:
        raise BundleError(f"{path} has a {n}-byte header, more than the {MAX_HEADER_BYTES} a bundle may have")


def parse_manifest(text: str, path: Path):
    """The manifest JSON, refused when longer than MAX_MANIFEST_BYTES or nested deeper than MAX_DEPTH."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path} has a {len(text)}-byte manifest, more than the {MAX_MANIFEST_BYTES} a bundle may have")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} has an Offramp manifest that is not valid JSON ({e})") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise BundleError(f"{path} has an Offramp manifest that cannot be read ({' '.join(str(e).split())[:120]})") from None
    except RecursionError:
        raise BundleError(f"{path} has a manifest nested deeper than the {MAX_DEPTH} levels a bundle may have") from None
    if _depth(manifest) > MAX_DEPTH:
        raise BundleError(f"{path} has a manifest nested deeper than the {MAX_DEPTH} levels a bundle may have")
    return manifest


def _depth(obj) -> int:
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > MAX_DEPTH:
            break
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return deepest


# -- the manifest's sections ----------------------------------------------------------------------
def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _non_finite(obj, where: str, skip: tuple[str, ...] = ("info",)) -> str | None:
    """The place of the first NaN or ±inf in `obj` (dict keys in `skip` are not looked into), else None."""
    stack = [(obj, where)]
    while stack:
        o, at = stack.pop()
        if isinstance(o, float) and not math.isfinite(o):
            return at
        if isinstance(o, dict):
            stack.extend((v, f"{at}.{k}") for k, v in o.items() if k not in skip)
        elif isinstance(o, list):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(o))
    return None


def check_sections(manifest: dict, path: Path) -> None:
    """Check the types, ranges and finiteness of everything the manifest declares that rebuilds the
    model (backbone, preset, classes, exits, policies, cost), before anything is built."""
    def bad(what: str):
        return BundleError(f"{path} has an invalid manifest: {what}")

    for key in ("backbone", "preset", "exits", "policies", "cost"):
        if key in manifest:
            at = _non_finite(manifest[key], key)
            if at is not None:
                raise bad(f"{at} is not a finite number")
    backbone = manifest["backbone"]
    if not isinstance(backbone, dict) or not isinstance(backbone.get("name"), str) \
            or not isinstance(backbone.get("kwargs") or {}, dict):
        raise BundleError(f"{path} has an invalid backbone entry {_short(backbone)} in its manifest")
    names = manifest["class_names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad("class_names must be a list of strings")
    if not 1 <= len(names) <= MAX_CLASSES:
        raise bad(f"it names {len(names)} classes; a bundle has 1 to {MAX_CLASSES}")
    for i, n in enumerate(names):
        problem = class_name_problem(n)
        if problem is not None:
            raise bad(f"class name {i} ({ascii(n[:40])}) cannot be used: {problem}")
    if len(set(names)) != len(names):
        twice = sorted(n for n, count in Counter(names).items() if count > 1)
        raise bad(f"class names {', '.join(map(ascii, twice[:5]))} appear more than once")
    _check_exits(manifest["exits"], len(names), bad)
    if "preset" in manifest:
        _check_preset(manifest["preset"], bad)
    policies = manifest["policies"]
    if not isinstance(policies, dict) or not policies:
        raise BundleError(f"{path} has no policies in its manifest")
    if len(policies) > MAX_POLICIES:
        raise bad(f"it has {len(policies)} policies; a bundle has at most {MAX_POLICIES}")
    for name, entry in policies.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str):
            raise bad(f"policy {name[:80]!r} is not an object with a kind")
    if not isinstance(manifest["default_policy"], str):
        raise bad("default_policy must be a policy name")
    if not isinstance(manifest.get("meta", {}) or {}, dict):
        raise bad("meta must be an object")
    _check_cost(manifest["cost"], [e["stage"] for e in manifest["exits"]], bad)


def _short(obj, n: int = 80) -> str:
    text = repr(obj)
    return text if len(text) <= n else text[:n] + "…"


def _check_exits(exits, num_classes: int, bad) -> None:
    if not isinstance(exits, list) or not 1 <= len(exits) <= MAX_EXITS:
        raise bad(f"exits must be a list of 1 to {MAX_EXITS} exit entries")
    for i, e in enumerate(exits):
        if not isinstance(e, dict):
            raise bad(f"exit {i} is not an object")
        for key, low in (("stage", 0), ("channels", 1), ("num_classes", 1), ("hidden", 0)):
            v = e.get(key, 0 if key == "hidden" else None)
            if not _is_int(v) or v < low:
                raise bad(f"exit {i} has {key} {_short(v)}, not a whole number of at least {low}")
        if e.get("kind") not in HEAD_KINDS:
            raise bad(f"exit {i} has head kind {_short(e.get('kind'))}; known kinds: {', '.join(HEAD_KINDS)}")
        if e["num_classes"] != num_classes:
            raise bad(f"exit {i} declares {e['num_classes']} classes but the bundle names {num_classes}")


def _check_preset(preset, bad) -> None:
    if not isinstance(preset, dict):
        raise bad("preset must be an object")
    for key in ("crop", "resize"):
        v = preset.get(key)
        if not _is_int(v) or not 1 <= v <= MAX_IMAGE_SIDE:
            raise bad(f"preset {key} is {_short(v)}, not a size of 1 to {MAX_IMAGE_SIDE} pixels")
    for key in ("mean", "std"):
        v = preset.get(key)
        if not isinstance(v, list) or len(v) != 3 or not all(_is_number(x) for x in v):
            raise bad(f"preset {key} is {_short(v)}, not three numbers")
    if not all(s > 0 for s in preset["std"]):
        raise bad(f"preset std {preset['std']} has a value that is not positive")


def _check_cost(cost, exit_stages: list[int], bad) -> None:
    if not isinstance(cost, dict):
        raise bad("cost must be an object")
    lists = ("exit_stages", "stage_flops", "exit_flops", "policy_flops", "stage_ms", "exit_ms")
    for key in lists:
        v = cost.get(key, [])
        if not isinstance(v, list) or len(v) > MAX_COST_ENTRIES:
            raise bad(f"cost {key} must be a list of at most {MAX_COST_ENTRIES} numbers")
        if not all(_is_number(x) and x >= 0 for x in v):
            raise bad(f"cost {key} has a value that is not a non-negative number")
    if not isinstance(cost.get("device", ""), str):
        raise bad("cost device must be a string")
    if not cost.get("exit_flops") and not cost.get("exit_stages"):
        return  # not measured: Engine measures it
    n = len(exit_stages)
    if cost.get("exit_stages") != exit_stages:
        raise bad(f"cost describes exits at stages {_short(cost.get('exit_stages'))}, the exits sit at {exit_stages}")
    stages = len(cost.get("stage_flops", []))
    if stages <= max(exit_stages):
        raise bad(f"cost has {stages} stage FLOPs for exits up to stage {max(exit_stages)}")
    for key, want in (("exit_flops", (n,)), ("policy_flops", (0, n)), ("stage_ms", (0, stages)), ("exit_ms", (0, n))):
        if len(cost.get(key, [])) not in want:
            raise bad(f"cost {key} has {len(cost.get(key, []))} entries, not {' or '.join(map(str, want))}")


# -- building without allocating ------------------------------------------------------------------
try:
    from torch.overrides import TorchFunctionMode
    from torch.utils._device import _device_constructors
except ImportError:  # pragma: no cover - a torch without them builds for real (shapes are still checked)
    TorchFunctionMode, _device_constructors = None, None


if TorchFunctionMode is not None:
    class _LargeTensorsOnMeta(TorchFunctionMode):
        """Tensor constructors called without a device make tensors above SMALL_TENSOR elements on
        the "meta" device (a shape, no memory); small ones stay real, because builders may compute
        with them (torchvision's RegNet reads its stage widths out of a tensor)."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in _device_constructors() and kwargs.get("device") is None:
                shaped = func(*args, **{**kwargs, "device": "meta"})
                if isinstance(shaped, torch.Tensor) and shaped.numel() > SMALL_TENSOR:
                    return shaped
            return func(*args, **kwargs)


@contextmanager
def large_tensors_on_meta() -> Iterator[None]:
    """While active, modules built in this thread get their large parameters and buffers on the meta
    device: load real tensors into them with `load_state_dict(..., assign=True)`."""
    if TorchFunctionMode is None:
        yield
        return
    with _LargeTensorsOnMeta():
        yield


def meta_tensors_left(module: torch.nn.Module) -> list[str]:
    """Names of `module`'s parameters, buffers and plain tensor attributes still on the meta device."""
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    for name, m in module.named_modules():
        left += [f"{name}.{k}".lstrip(".") for k, v in vars(m).items() if isinstance(v, torch.Tensor) and v.is_meta]
    return left


# -- the weights ----------------------------------------------------------------------------------
def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over every tensor's name, dtype, shape and bytes, in name order: the same for
    the tensors saved and the tensors read back, whatever order the file stores them in."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        head = json.dumps([key, str(t.dtype), list(t.shape)]).encode("utf-8")
        h.update(len(head).to_bytes(8, "little"))
        h.update(head)
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def check_weights(manifest: dict, tensors: dict[str, torch.Tensor], path: Path,
                  temperature_key: str = "model.temperature") -> None:
    """Refuse weights that differ from the manifest's checksum (when it has one; older bundles do not),
    that hold NaN or ±inf, BatchNorm variances below 0 (every output would be NaN), or temperatures
    that are not positive."""
    want = manifest.get(CHECKSUM_KEY)
    if want is not None and want != tensors_checksum(tensors):
        raise BundleError(f"bundle {path} is damaged: its weights do not match their checksum")
    for key, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise BundleError(f"bundle {path} has NaN or infinite values in tensor {key}; it cannot be used")
    for key, t in tensors.items():
        if key.endswith("running_var") and t.is_floating_point() and bool((t < 0).any()):
            raise BundleError(f"bundle {path} has negative variances in tensor {key}; it cannot be used")
    temperature = tensors.get(temperature_key)
    if temperature is not None and temperature.numel() and not bool((temperature > 0).all()):
        raise BundleError(f"bundle {path} has exit temperatures {[round(float(x), 4) for x in temperature]}; "
                          "every temperature must be positive")
