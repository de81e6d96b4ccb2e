"""Bundles: one `.offramp` file that is enough to rebuild a trained multi-exit model, preprocess an
image, name its classes and choose exits.

The file is a safetensors file. Its tensors are the model's state_dict (prefix "model.") and each
policy's state_dict (prefix "policy.<name>."); its safetensors metadata holds one key, "offramp",
a JSON manifest with everything else (backbone spec, input preset, class names, exit specs,
policies, cost table, free-form meta) and "tensors_sha256", a checksum of the tensors that loading
verifies (bundles saved before it existed have none and still load). Loading never unpickles
anything, and checks every declared size and number before it allocates (engine.bundle_checks).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save as save_tensors

from . import __version__
from .backbones import InputPreset, build_backbone
from .bundle_checks import (CHECKSUM_KEY, BundleError,  # noqa: F401 - BundleError re-exported
                            check_header_length, check_sections, check_weights,
                            large_tensors_on_meta, meta_tensors_left, parse_manifest, tensors_checksum)
from .cost import CostTable
from .exits import ExitSpec
from .model import MultiExitNet
from .files import json_text, replacing
from .resources import RESOURCES_PACKAGE, resource_path  # noqa: F401 - RESOURCES_PACKAGE re-exported
from .policies import Policy, policy_from_json

log = logging.getLogger(__name__)

FORMAT = "offramp-bundle"
FORMAT_VERSION = 1
SUFFIX = ".offramp"
MANIFEST_KEY = "offramp"
_MODEL = "model."
_POLICY = "policy."


@dataclass
class Bundle:
    """A trained multi-exit model with its policies, measured cost and free-form (JSON-able) meta."""

    model: MultiExitNet
    policies: dict[str, Policy]
    default_policy: str
    cost: CostTable
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.policies:
            raise ValueError("a bundle needs at least one policy")
        if self.default_policy not in self.policies:
            raise ValueError(f"default policy {self.default_policy!r} is not one of the bundle's policies "
                             f"{sorted(self.policies)}")

    @property
    def class_names(self) -> list[str]:
        return self.model.class_names

    @property
    def policy(self) -> Policy:
        """The default policy."""
        return self.policies[self.default_policy]


def default_bundle_path() -> Path:
    """The built-in model: $OFFRAMP_DEFAULT_BUNDLE if set, else `resource_path("default.offramp")`."""
    env = os.environ.get("OFFRAMP_DEFAULT_BUNDLE")
    if env:
        return Path(env).expanduser()
    return resource_path(f"default{SUFFIX}")


# -- saving ---------------------------------------------------------------------------------------
def manifest_of(bundle: Bundle) -> dict:
    """The JSON manifest `save_bundle` writes for `bundle` (without checking it is JSON-able)."""
    model = bundle.model
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": {"name": model.backbone.spec["name"], "kwargs": dict(model.backbone.spec.get("kwargs", {}))},
        "preset": model.backbone.preset.to_json(),
        "class_names": list(model.class_names),
        "exits": [s.to_json() for s in model.exit_specs],
        "policies": {name: p.to_json() for name, p in bundle.policies.items()},
        "default_policy": bundle.default_policy,
        "cost": bundle.cost.to_json(),
        "meta": bundle.meta,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "offramp_version": __version__,
        "torch_version": torch.__version__,
    }


def _tensors_of(bundle: Bundle) -> dict[str, torch.Tensor]:
    """All tensors to store, on the CPU, contiguous, none sharing memory (safetensors refuses that)."""
    named = [(_MODEL + k, v) for k, v in bundle.model.state_dict().items()]
    for name, policy in bundle.policies.items():
        named += [(f"{_POLICY}{name}.{k}", v) for k, v in policy.state_dict().items()]
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in named:
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        # views, tied weights and empty tensors share (or may share) a storage: give them their own
        if ptr in seen or ptr == 0 or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[key] = t
    return out


def save_bundle(bundle: Bundle, path: str | os.PathLike) -> Path:
    """Write `bundle` to `path` as one safetensors file, atomically: a previous file at `path` is
    replaced only once the new one is complete (and on disk), and left untouched if anything fails.
    The manifest carries a SHA-256 of the tensors, which `load_bundle` verifies. Our stale temporary
    files in that folder (from a process killed mid-save) are removed first.

    Returns the path written. Raises ValueError when the meta is not JSON-able, OSError (one
    sentence naming the path) when the file cannot be written.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot save the bundle to {path}: it is a folder; give a file name such as "
                                f"{path / ('model' + SUFFIX)}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save the bundle to {path}: the folder {path.parent} does not exist")
    tensors = _tensors_of(bundle)
    try:
        manifest = json_text({**manifest_of(bundle), CHECKSUM_KEY: tensors_checksum(tensors)})
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot save bundle to {path}: its meta is not JSON-able ({e})") from None
    data = save_tensors(tensors, metadata={MANIFEST_KEY: manifest})
    try:
        with replacing(path) as tmp:  # same folder, so the final rename is atomic
            _write(tmp, data)
    except OSError as e:
        log.debug("saving %s failed", path, exc_info=True)
        err = OSError(f"cannot save the bundle to {path}: {e.strerror or e}")
        err.errno = e.errno  # for callers that look (ENOSPC, EACCES); the message stays one sentence
        raise err from e
    return path


def _write(tmp: Path, data: bytes) -> None:
    # bytes written here, not by safetensors' save_file: that one writes through a temporary of its
    # own (".tmpXXXXXX"), which a kill mid-write would leave behind under a name nobody recognises
    with open(tmp, "wb") as f:
        f.write(data)


# -- reading --------------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike) -> dict:
    """The JSON manifest of the bundle at `path`, reading only the file's header, with every section
    that rebuilds the model checked (types, ranges, finite numbers, size limits: engine.bundle_checks).

    Raises BundleError when the file is missing, not a safetensors file, has no valid manifest,
    is of another format or a newer format version, or declares something invalid or too large.
    """
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle file {path} does not exist")
    if not path.is_file():
        raise BundleError(f"bundle path {path} is not a file")
    try:
        check_header_length(path)
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except BundleError:
        raise
    except OSError as e:
        raise BundleError(f"bundle file {path} cannot be read ({e.strerror or e})") from None
    except Exception as e:  # safetensors raises its own SafetensorError for any damaged header
        raise BundleError(f"{path} is not a valid bundle: not a readable safetensors file "
                          f"(truncated or garbage: {_one_line(e)})") from None
    text = metadata.get(MANIFEST_KEY)
    if text is None:
        raise BundleError(f"{path} is a safetensors file without an Offramp manifest, so not a bundle")
    manifest = parse_manifest(text, path)
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} has an Offramp manifest that is not a JSON object")
    _check_format(manifest, path)
    check_sections(manifest, path)
    return manifest


def _one_line(e: BaseException, n: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= n else text[:n] + "…"


def _check_format(manifest: dict, path: Path) -> None:
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not an Offramp bundle (format {_one_line(repr(manifest.get('format')), 80)}, "
                          f"expected {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"{path} has an unknown bundle format version {_one_line(repr(version), 80)}")
    if version > FORMAT_VERSION:
        raise BundleError(f"{path} was written by a newer Offramp (bundle format version {version}; this one reads "
                          f"up to {FORMAT_VERSION}): upgrade Offramp to open it")
    missing = [k for k in ("backbone", "class_names", "exits", "policies", "default_policy", "cost")
               if k not in manifest]
    if missing:
        raise BundleError(f"{path} has a manifest without {', '.join(missing)}")


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the bundle at `path` on `device` (model in eval mode). Never unpickles.

    In order, so that a small file can never make it allocate much: the manifest is checked
    (`read_manifest`); the model and policies are built with their large tensors on the meta device
    (no memory); their tensor names and shapes are compared with the file's header; only then are
    the weights read, compared with the manifest's checksum (bundles from before checksums have
    none) and checked for NaN, ±inf and non-positive temperatures.

    Raises BundleError, naming the file and what is wrong, for every damaged or unreadable bundle.
    """
    path = Path(path)
    manifest = read_manifest(path)
    model, policies = _build(manifest, path)
    # each module's file keys from its own state_dict: prefixes alone are ambiguous ("a." vs "a.b.")
    modules = {_MODEL: model, **{f"{_POLICY}{name}.": p for name, p in policies.items()}}
    expected = {prefix + k: v for prefix, m in modules.items() for k, v in m.state_dict().items()}
    _check_tensors(expected, _header_shapes(path), path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:
        raise BundleError(f"{path} has tensor data that cannot be read ({_one_line(e)})") from None
    check_weights(manifest, tensors, path)
    try:
        for prefix, m in modules.items():
            state = {k: _as_dtype(tensors[prefix + k], v.dtype, prefix + k, path) for k, v in m.state_dict().items()}
            m.load_state_dict(state, strict=True, assign=True)  # the read tensors replace the meta ones
    except RuntimeError as e:  # anything _check_tensors did not foresee
        raise BundleError(f"{path} has weights that do not fit its model ({_one_line(e)})") from None
    left = [f"{prefix}{n}" for prefix, m in modules.items() for n in meta_tensors_left(m)]
    assert not left, f"tensors not loaded from {path}: {left[:3]}"  # a module keeps tensors outside its state_dict
    model.to(device).eval()
    for p in policies.values():
        p.to(device).eval()
    try:
        cost = CostTable.from_json(manifest["cost"])
        return Bundle(model, policies, manifest["default_policy"], cost, manifest.get("meta") or {})
    except (TypeError, ValueError, KeyError) as e:
        raise BundleError(f"{path} has an invalid manifest: {_one_line(e)}") from None


def _as_dtype(t: torch.Tensor, dtype: torch.dtype, key: str, path: Path) -> torch.Tensor:
    """`t` as `dtype`: floating point may be cast (a bundle saved in half precision), nothing else."""
    if t.dtype == dtype:
        return t
    if t.is_floating_point() and dtype.is_floating_point:
        return t.to(dtype)
    raise BundleError(f"{path} has tensor {key} of type {t.dtype}, expected {dtype}")


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape as the file's header declares it, without reading any tensor data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise BundleError(f"{path} has tensor data that cannot be read ({_one_line(e)})") from None


def _build(manifest: dict, path: Path) -> tuple[MultiExitNet, dict[str, Policy]]:
    """Model and policies from the manifest alone, their large tensors on the meta device (no memory
    used, whatever sizes the manifest declares): `load_bundle` compares their shapes with the file's
    before it reads any weights, then loads those in their place."""
    try:
        with large_tensors_on_meta():
            return _build_modules(manifest, path)
    except NotImplementedError:  # a builder read values out of a meta tensor: build for real
        log.debug("building %s on the meta device failed; building it for real", path, exc_info=True)
        return _build_modules(manifest, path)


def _build_modules(manifest: dict, path: Path) -> tuple[MultiExitNet, dict[str, Policy]]:
    spec = manifest["backbone"]
    name, kwargs = spec["name"], dict(spec.get("kwargs") or {})
    try:
        backbone = build_backbone(name, weights=None, **kwargs)
    except ValueError as e:
        raise BundleError(f"{path} needs backbone {name[:80]!r} that cannot be built here: {_one_line(e)}") from None
    except NotImplementedError:  # it cannot be built on the meta device: `_build` builds it for real
        raise
    except (TypeError, RuntimeError) as e:
        raise BundleError(f"{path} builds backbone {name[:80]!r} with arguments {_one_line(kwargs, 120)} it does "
                          f"not take ({_one_line(e)})") from None
    try:
        if "preset" in manifest:
            backbone.preset = InputPreset.from_json(manifest["preset"])
        specs = [ExitSpec.from_json(d) for d in manifest["exits"]]
        model = MultiExitNet.from_specs(backbone, specs, manifest["class_names"])
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        raise BundleError(f"{path} has exits or classes that do not fit backbone {name!r}: {_one_line(e)}") from None
    policies: dict[str, Policy] = {}
    for pname, d in manifest["policies"].items():
        try:
            policies[pname] = policy_from_json(d, num_exits=model.num_exits, num_classes=model.num_classes)
        except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
            raise BundleError(f"{path} has policy {pname[:80]!r} that cannot be rebuilt: {_one_line(e)}") from None
    if manifest["default_policy"] not in policies:
        raise BundleError(f"{path} names default policy {manifest['default_policy'][:80]!r}, "
                          f"which is not one of its policies {sorted(policies)[:8]}")
    return model, policies


def _check_tensors(expected: dict[str, torch.Tensor], found: dict[str, tuple[int, ...]], path: Path) -> None:
    """The file's tensors (name → shape from its header) are exactly those the model needs."""
    def few(names: list[str]) -> str:
        return _one_line(", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else ""))

    missing = [k for k in expected if k not in found]
    if missing:
        raise BundleError(f"{path} lacks {len(missing)} tensor(s) its model needs: {few(missing)}")
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        raise BundleError(f"{path} holds {len(unexpected)} tensor(s) its model does not have: {few(unexpected)}")
    for k, want in expected.items():
        if tuple(found[k]) != tuple(want.shape):
            raise BundleError(f"{path} has tensor {k} of shape {tuple(found[k])}, expected {tuple(want.shape)}: "
                              "its manifest declares sizes its weights do not have")
