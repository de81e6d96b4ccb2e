"""Bundles: one `.offramp` file that is enough to rebuild a trained multi-exit model, preprocess an
image, name its classes and choose exits.

The file is a safetensors file. Its tensors are the model's state_dict (prefix "model.") and each
policy's state_dict (prefix "policy.<name>."); its safetensors metadata holds one key, "offramp",
a JSON manifest with everything else (backbone spec, input preset, class names, exit specs,
policies, cost table, free-form meta). Loading never unpickles anything.
"""
from __future__ import annotations

import datetime
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from .backbones import InputPreset, build_backbone
from .cost import CostTable
from .exits import ExitSpec
from .model import MultiExitNet
from .files import current_umask
from .resources import RESOURCES_PACKAGE, resource_path  # noqa: F401 - RESOURCES_PACKAGE re-exported
from .policies import Policy, policy_from_json

FORMAT = "offramp-bundle"
FORMAT_VERSION = 1
SUFFIX = ".offramp"
MANIFEST_KEY = "offramp"
_MODEL = "model."
_POLICY = "policy."


class BundleError(ValueError):
    """A bundle file is missing, damaged, or not one this version of Offramp can read."""


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
    replaced only once the new one is complete, and left untouched if anything fails.

    Returns the path written. Raises ValueError when the meta is not JSON-able, OSError when the
    folder cannot be written.
    """
    path = Path(path)
    try:
        manifest = json.dumps(manifest_of(bundle))
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot save bundle to {path}: its meta is not JSON-able ({e})") from None
    tensors = _tensors_of(bundle)
    # same folder, so os.replace is an atomic rename; a random name, so two savers never collide
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        save_file(tensors, str(tmp), metadata={MANIFEST_KEY: manifest})
        os.chmod(tmp, 0o666 & ~current_umask())  # safetensors writes owner-only files
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


# -- reading --------------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike) -> dict:
    """The JSON manifest of the bundle at `path`, reading only the file's header.

    Raises BundleError when the file is missing, not a safetensors file, has no valid manifest,
    or is of another format or a newer format version.
    """
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle file {path} does not exist")
    if not path.is_file():
        raise BundleError(f"bundle path {path} is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except OSError as e:
        raise BundleError(f"bundle file {path} cannot be read ({e})") from None
    except Exception as e:  # safetensors raises its own SafetensorError for any damaged header
        raise BundleError(f"{path} is not a valid bundle: not a readable safetensors file "
                          f"(truncated or garbage: {e})") from None
    text = metadata.get(MANIFEST_KEY)
    if text is None:
        raise BundleError(f"{path} is a safetensors file without an Offramp manifest, so not a bundle")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} has an Offramp manifest that is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} has an Offramp manifest that is not a JSON object")
    _check_format(manifest, path)
    return manifest


def _check_format(manifest: dict, path: Path) -> None:
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path} is not an Offramp bundle (format {manifest.get('format')!r}, "
                          f"expected {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"{path} has an unknown bundle format version {version!r}")
    if version > FORMAT_VERSION:
        raise BundleError(f"{path} was written by a newer Offramp (bundle format version {version}; this one reads "
                          f"up to {FORMAT_VERSION}): upgrade Offramp to open it")
    missing = [k for k in ("backbone", "class_names", "exits", "policies", "default_policy", "cost")
               if k not in manifest]
    if missing:
        raise BundleError(f"{path} has a manifest without {', '.join(missing)}")


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the bundle at `path` on `device` (model in eval mode). Never unpickles.

    Raises BundleError, naming the file and what is wrong, for every damaged or unreadable bundle.
    """
    path = Path(path)
    manifest = read_manifest(path)
    model, policies = _build(manifest, path)
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as e:
        raise BundleError(f"{path} has tensor data that cannot be read ({e})") from None
    # each module's file keys from its own state_dict: prefixes alone are ambiguous ("a." vs "a.b.")
    modules = {_MODEL: model, **{f"{_POLICY}{name}.": p for name, p in policies.items()}}
    expected = {prefix + k: v for prefix, m in modules.items() for k, v in m.state_dict().items()}
    _check_tensors(expected, tensors, path)
    try:
        for prefix, m in modules.items():
            m.load_state_dict({k: tensors[prefix + k] for k in m.state_dict()}, strict=True)
    except RuntimeError as e:  # dtype casts or anything _check_tensors did not foresee
        raise BundleError(f"{path} has weights that do not fit its model ({e})") from None
    model.to(device).eval()
    for p in policies.values():
        p.to(device).eval()
    try:
        cost = CostTable.from_json(manifest["cost"])
        return Bundle(model, policies, manifest["default_policy"], cost, manifest.get("meta") or {})
    except (TypeError, ValueError, KeyError) as e:
        raise BundleError(f"{path} has an invalid manifest: {e}") from None


def _build(manifest: dict, path: Path) -> tuple[MultiExitNet, dict[str, Policy]]:
    """Model and policies with freshly initialised tensors, from the manifest alone."""
    spec = manifest["backbone"]
    try:
        name, kwargs = spec["name"], dict(spec.get("kwargs") or {})
    except (TypeError, KeyError, AttributeError):
        raise BundleError(f"{path} has an invalid backbone entry {spec!r} in its manifest") from None
    try:
        backbone = build_backbone(name, weights=None, **kwargs)
    except ValueError as e:
        raise BundleError(f"{path} needs backbone {name!r} that cannot be built here: {e}") from None
    except TypeError as e:
        raise BundleError(f"{path} builds backbone {name!r} with arguments {kwargs} it does not take ({e})") from None
    try:
        if "preset" in manifest:
            backbone.preset = InputPreset.from_json(manifest["preset"])
        specs = [ExitSpec.from_json(d) for d in manifest["exits"]]
        model = MultiExitNet.from_specs(backbone, specs, manifest["class_names"])
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise BundleError(f"{path} has exits or classes that do not fit backbone {name!r}: {e}") from None
    entries = manifest["policies"]
    if not isinstance(entries, dict) or not entries:
        raise BundleError(f"{path} has no policies in its manifest")
    policies: dict[str, Policy] = {}
    for pname, d in entries.items():
        try:
            policies[pname] = policy_from_json(d, num_exits=model.num_exits, num_classes=model.num_classes)
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise BundleError(f"{path} has policy {pname!r} that cannot be rebuilt: {e}") from None
    if manifest["default_policy"] not in policies:
        raise BundleError(f"{path} names default policy {manifest['default_policy']!r}, "
                          f"which is not one of its policies {sorted(policies)}")
    return model, policies


def _check_tensors(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], path: Path) -> None:
    def few(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    missing = [k for k in expected if k not in found]
    if missing:
        raise BundleError(f"{path} lacks {len(missing)} tensor(s) its model needs: {few(missing)}")
    unexpected = [k for k in found if k not in expected]
    if unexpected:
        raise BundleError(f"{path} holds {len(unexpected)} tensor(s) its model does not have: {few(unexpected)}")
    for k, want in expected.items():
        if tuple(found[k].shape) != tuple(want.shape):
            raise BundleError(f"{path} has tensor {k} of shape {tuple(found[k].shape)}, "
                              f"expected {tuple(want.shape)}")
