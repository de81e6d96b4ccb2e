"""Any network cut at named layers (backbone "cut", family "any").

A model SPEC names where the network comes from:

    resnet50                       a torchvision model (torchvision.models.list_models())
    timm:vit_tiny_patch16_224      a timm model (the optional extra: pip install 'offramp[timm]')
    module:my_pkg.models:make_net  a user's factory: a callable taking no arguments that returns an
                                   nn.Module (the module must be importable where the bundle loads)

`build_backbone("cut", model=SPEC, taps=[NAME, ...])` cuts it after each named layer: through the
children of an nn.Sequential when the model is one and every tap is a child, through torch.fx
otherwise (engine.backbones.cut), refusing in one sentence a cut that a skip connection crosses.
The stages followed by the model's classifier compute what the original model computes (checked
on an example image at every build). A bundle stores only the spec, the taps and the weights.
"""
from __future__ import annotations

import importlib
import math
import sys

import torch
from torch import nn

from . import cut
from ._base import InputPreset, StagedBackbone, Tap, WeightsUnavailable, register_backbone

NAME = "cut"
TOKEN_POOLS = ("cls", "mean")
DEFAULT_SIZE = 224
MAX_INPUT_SIZE = 4096


# -- where the network comes from -----------------------------------------------------------------
def describe_spec(spec: str) -> tuple[str, str]:
    """(source, name) of a model SPEC: ("torchvision", "resnet50"), ("timm", NAME) or
    ("module", "pkg.mod:factory"). Raises ValueError for a malformed SPEC."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec {spec!r} is empty; give a torchvision name, timm:NAME or module:pkg.mod:factory")
    source, sep, rest = spec.partition(":")
    if not sep:
        return "torchvision", spec
    if source == "timm" and rest:
        return "timm", rest
    if source == "module" and rest.count(":") == 1 and all(rest.split(":")):
        return "module", rest
    raise ValueError(f"model spec {spec!r} is not a torchvision name, timm:NAME or module:pkg.mod:factory")


def load_network(spec: str, *, weights: str | None = None, model_kwargs: dict | None = None
                 ) -> tuple[nn.Module, InputPreset]:
    """The unchanged network SPEC names and the input preset it expects.

    `weights`: None (random init), or "DEFAULT"/a torchvision weights name (torchvision), "DEFAULT"
    (timm's pretrained weights). Raises ValueError for an unknown or unloadable SPEC,
    WeightsUnavailable when pretrained weights cannot be had.
    """
    source, name = describe_spec(spec)
    kwargs = _checked_kwargs(model_kwargs or {}, spec)
    if source == "torchvision":
        return _torchvision(name, weights, kwargs)
    if source == "timm":
        return _timm(name, weights, kwargs)
    if weights is not None or kwargs:
        raise ValueError(f"model {spec!r} is built by its own factory, called without arguments: it loads its own "
                         "weights, so drop the weights and model arguments")
    return _module(spec, name), InputPreset(crop=DEFAULT_SIZE, resize=256)


def _checked_kwargs(kwargs: dict, spec: str) -> dict:
    """Model arguments that shape the network (img_size=64, depth=4), nothing else: a bundle comes from
    anywhere, and a string or a `pretrained*` argument could make a builder read or fetch a file."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"the model arguments of {spec!r} must be an object of name: number, not {kwargs!r}")

    def plain(v) -> bool:
        return isinstance(v, (bool, int, float)) or (isinstance(v, (list, tuple)) and len(v) <= 8
                                                     and all(isinstance(x, (int, float)) for x in v))
    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("pretrained") or not plain(value):
            raise ValueError(f"model argument {key!r}={value!r} of {spec!r} is refused: only numbers and flags "
                             "that shape the network (e.g. img_size=64), never pretrained* or paths")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def _torchvision(name: str, weights: str | None, kwargs: dict) -> tuple[nn.Module, InputPreset]:
    from torchvision import models as tvm

    from .torchvision_models import _load_state_dict, _preset, _resolve_weights
    if name not in tvm.list_models():
        raise ValueError(f"unknown model {name!r}: not a torchvision model (see torchvision.models.list_models()); "
                         "for others write timm:NAME or module:pkg.mod:factory")
    enum_weights = _resolve_weights(name, weights)
    try:  # weights=None here: loading ourselves keeps torchvision from downloading without a timeout
        model = tvm.get_model(name, weights=None, **kwargs)
    except TypeError as err:
        raise ValueError(f"torchvision's {name} does not take the arguments {kwargs} ({err})") from None
    if enum_weights is not None:
        model.load_state_dict(_load_state_dict(name, enum_weights))
    return model, _preset(enum_weights)


def _timm(name: str, weights: str | None, kwargs: dict) -> tuple[nn.Module, InputPreset]:
    try:
        import timm
    except ImportError:
        raise ValueError(f"model timm:{name} needs timm, which is not installed: pip install 'offramp[timm]'") from None
    if weights not in (None, "DEFAULT"):
        raise ValueError(f"timm:{name} takes weights DEFAULT (timm's pretrained weights) or none, not {weights!r}")
    if not timm.is_model(name):
        raise ValueError(f"unknown model timm:{name}: not one of timm's (see timm.list_models())")
    try:
        model = timm.create_model(name, pretrained=weights is not None, **kwargs)
    except TypeError as err:
        raise ValueError(f"timm's {name} does not take the arguments {kwargs} ({err})") from None
    except (OSError, RuntimeError) as err:  # hub downloads fail with many kinds
        if weights is None:
            raise
        raise WeightsUnavailable(f"the pretrained weights of timm:{name} could not be had ({err}); put them into "
                                 "the Hugging Face cache or connect to the network") from err
    cfg = getattr(model, "pretrained_cfg", None) or {}
    crop = int(cfg.get("input_size", (3, DEFAULT_SIZE, DEFAULT_SIZE))[-1])
    preset = InputPreset(crop=crop, resize=int(math.floor(crop / float(cfg.get("crop_pct", 0.875)))),
                         mean=tuple(cfg.get("mean", InputPreset.mean)), std=tuple(cfg.get("std", InputPreset.std)))
    return model, preset


def _module(spec: str, name: str) -> nn.Module:
    module_name, factory_name = name.split(":")
    if module_name.split(".")[0] in sys.stdlib_module_names or factory_name.startswith("_"):
        raise ValueError(f"model {spec!r} does not name a model factory: give module:your_package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model {spec!r} needs the Python module {module_name!r}, which cannot be imported here "
                         f"({err}); install it or put its folder on PYTHONPATH") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ValueError(f"model {spec!r}: the module {module_name!r} has no callable {factory_name!r}")
    model = factory()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r}: {factory_name}() returned a {type(model).__name__}, not an nn.Module")
    return model


# -- what a tap gives ------------------------------------------------------------------------------
def _tap(name: str, shape: tuple, size: int, token_pool: str) -> tuple[Tap, bool]:
    """The Tap of an output of `shape` (batch first) for an input `size` pixels square, and whether
    the model holds it channels-last (batch, h, w, channels): such a stage hands it over as a map."""
    if len(shape) == 2:
        return Tap(name, shape[1], 0, layout="vector"), False
    if len(shape) == 3:
        return Tap(name, shape[2], 0, layout="tokens", pool=token_pool), False
    if len(shape) == 4:
        _, a, h, w = shape
        if h == w or a != h:  # (batch, channels, h, w), the usual
            return Tap(name, a, max(size // max(w, 1), 1)), False
        return Tap(name, w, max(size // max(h, 1), 1)), True  # (batch, h, w, channels): Swin's stages
    raise ValueError(f"cannot put an exit after {name!r}: its output has shape {tuple(shape)}, which is not a "
                     "feature map, a sequence of tokens or a vector")


def _example(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def _check_real(model: nn.Module) -> None:
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        # a bundle builds on the meta device first; cutting runs the model once, so build it for real
        raise NotImplementedError("cutting a model runs it once, which needs real weights")


# -- the two ways of cutting ------------------------------------------------------------------------
def _sequential_cut(model: nn.Sequential, taps: list[str], size: int, token_pool: str, what: str):
    """Stages from the children of an nn.Sequential; the classifier from its last Linear child on."""
    names = [n for n, _ in model.named_children()]
    children = list(model.children())
    linear = [i for i, c in enumerate(children) if isinstance(c, nn.Linear)]
    end = linear[-1] if linear else len(children)
    cuts = sorted({names.index(t) for t in taps})
    if cuts and cuts[-1] >= end:
        raise ValueError(f"cannot put an exit after {names[cuts[-1]]!r} of {what}: it is the classifier or after it")
    cuts = [c for c in cuts if c != end - 1] + [end - 1]  # the last stage ends at the classifier's input
    stages, spans, start = [], [], 0
    for c in cuts:
        stages.append(nn.Sequential(*children[start:c + 1]))
        spans.append(names[c] if c < end - 1 or not linear else names[end])
        start = c + 1
    classifier = nn.Sequential(*children[end:]) if linear else None
    x, out_taps = _example(size), []
    with torch.no_grad():
        for stage, name in zip(stages, spans):
            x = stage(x)
            tap, nhwc = _tap(name, tuple(x.shape), size, token_pool)
            if nhwc:
                raise ValueError(f"cannot put an exit after {name!r} of {what}: its output is channels-last")
            out_taps.append(tap)
    return stages, out_taps, classifier


def _fx_cut(model: nn.Module, taps: list[str], size: int, token_pool: str, what: str):
    """Stages as torch.fx subgraphs ending after each tap; the classifier after the last Linear's input."""
    graph = cut.Graph(cut.trace(model, what), what)
    found = cut.probe(graph, _example(size))
    head = graph.classifier_node()
    final = head.args[0] if head is not None else graph.output.args[0]
    nodes = []
    for layer in taps:
        node = graph.node_after(layer)
        if graph.pos[node] > graph.pos[final] or (head is not None and node is head):
            raise ValueError(f"cannot put an exit after {layer!r} of {what}: it is the classifier or after it")
        graph.check_cut(layer, node)
        nodes.append((graph.pos[node], layer, node))
    nodes = sorted(n for n in nodes if n[2] is not final)
    final_name = str(head.target) if head is not None else "output"
    ends = [(layer, node) for _, layer, node in nodes] + [(final_name, final)]
    stages, out_taps, start, nhwc_in = [], [], graph.input, False
    for layer, node in ends:
        shape = found.shapes.get(node)
        if shape is None:
            raise ValueError(f"cannot put an exit after {layer!r} of {what}: its output is not one tensor")
        tap, nhwc = _tap(layer, shape, size, token_pool)
        stages.append(cut.subgraph(graph, start, node, nhwc_in=nhwc_in, nhwc_out=nhwc))
        out_taps.append(tap)
        start, nhwc_in = node, nhwc
    classifier = cut.subgraph(graph, final, graph.output.args[0]) if head is not None else None
    return stages, out_taps, classifier


def _replace_classifier(model: nn.Module, num_classes: int, what: str) -> None:
    """A new (untrained) final Linear for `num_classes` when the model's predicts another number."""
    if isinstance(model, nn.Sequential):
        linear = [n for n, c in model.named_children() if isinstance(c, nn.Linear)]
        target = linear[-1] if linear else None
    else:
        graph = cut.Graph(cut.trace(model, what), what)
        head = graph.classifier_node()
        target = str(head.target) if head is not None else None
    if target is None:
        return
    old = model.get_submodule(target)
    if old.out_features != num_classes:
        model.set_submodule(target, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _check_same(backbone: StagedBackbone, model: nn.Module, size: int, what: str) -> None:
    """The stages and the classifier must compute what the model computes (eval mode, one image)."""
    x = _example(size)
    was = model.training
    model.eval()
    backbone.eval()
    try:
        with torch.no_grad():
            want, got = model(x), backbone(x)
    finally:
        model.train(was)
        backbone.train(was)
    if not isinstance(want, torch.Tensor) or want.shape != got.shape or not torch.allclose(want, got, atol=1e-4,
                                                                                             rtol=1e-3):
        raise ValueError(f"cannot cut {what} at these layers: the stages do not compute what the model computes "
                         "(its forward does more than its layers in order)")


# -- the registered builder ------------------------------------------------------------------------
@register_backbone(NAME, family="any", description="any torchvision, timm: or module: model cut after named layers "
                   "(offramp train-exits --model SPEC --taps ...)")
def cut_model(*, model: str, taps: list[str], weights: str | None = None, num_classes: int | None = None,
              token_pool: str | None = None, input_size: int | None = None,
              model_kwargs: dict | None = None) -> StagedBackbone:
    """`model` (a SPEC) cut after each layer in `taps`, a last stage up to its classifier's input.

    `token_pool`: how exits read tokens (batch, tokens, channels): "cls" (the class token) or
    "mean"; default "cls" when the model has a class token. `input_size`: the square side of the
    input image (default: what the model expects). Raises ValueError naming the layer for a cut
    that is impossible, WeightsUnavailable when pretrained weights cannot be had.
    """
    if not isinstance(taps, (list, tuple)) or not taps or not all(isinstance(t, str) and t for t in taps):
        raise ValueError(f"taps {taps!r} must be a list of layer names, e.g. layer1,layer2,layer3")
    if len(set(taps)) != len(taps):
        raise ValueError(f"taps {list(taps)} name a layer twice")
    if token_pool not in (None, *TOKEN_POOLS):
        raise ValueError(f"token_pool {token_pool!r} is not one of {', '.join(TOKEN_POOLS)}")
    if input_size is not None and (not isinstance(input_size, int) or not 8 <= input_size <= MAX_INPUT_SIZE):
        raise ValueError(f"input_size {input_size!r} is not a whole number of pixels from 8 to {MAX_INPUT_SIZE}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer, not {num_classes!r}")
    net, preset = load_network(model, weights=weights, model_kwargs=model_kwargs)
    _check_real(net)
    if input_size is not None:
        preset = InputPreset(crop=input_size, resize=input_size, mean=preset.mean, std=preset.std)
    pool = token_pool or ("cls" if getattr(net, "cls_token", None) is not None else "mean")
    if num_classes is not None:
        _replace_classifier(net, num_classes, model)
    sequential = isinstance(net, nn.Sequential) and all(t in dict(net.named_children()) for t in taps)
    cutter = _sequential_cut if sequential else _fx_cut
    stages, out_taps, classifier = cutter(net, list(taps), preset.crop, pool, model)
    k = _classes(classifier, out_taps[-1])
    spec = {"name": NAME, "kwargs": {"model": model, "taps": list(taps), "num_classes": k, "token_pool": pool,
                                     "input_size": preset.crop, "model_kwargs": _as_json(model_kwargs or {})}}
    backbone = StagedBackbone(stages, out_taps, classifier, preset, spec)
    _check_same(backbone, net, preset.crop, model)
    return backbone


def _as_json(kwargs: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def _classes(classifier: nn.Module | None, last: Tap) -> int:
    linears = [m for m in classifier.modules() if isinstance(m, nn.Linear)] if classifier is not None else []
    return linears[-1].out_features if linears else last.channels


def layers(spec: str, *, max_depth: int = 2, input_size: int | None = None,
           model_kwargs: dict | None = None) -> tuple[list[tuple[str, tuple, float]], float, int]:
    """The layers the model SPEC can be cut after (name, output shape, FLOPs up to it), the FLOPs
    of the whole model and the input size used. Raises ValueError when it cannot be traced."""
    net, preset = load_network(spec, model_kwargs=model_kwargs)
    size = input_size or preset.crop
    graph = cut.Graph(cut.trace(net, spec), spec)
    found = cut.probe(graph, _example(size))
    return cut.candidate_layers(graph, found, max_depth), found.flops[graph.output], size


def categories(spec: str, weights: str | None, num_classes: int) -> list[str]:
    """The class names the classifier of model SPEC predicts with `weights`: torchvision's and timm's
    ImageNet names for 1000 classes, else "class 0", "class 1", ..."""
    source, name = describe_spec(spec)
    if weights is not None and num_classes == 1000 and source == "torchvision":
        from .torchvision_models import torchvision_categories
        return torchvision_categories(name, weights)
    if weights is not None and num_classes == 1000 and source == "timm":
        from timm.data import ImageNetInfo
        return [d.split(",")[0] for d in ImageNetInfo().label_descriptions()]
    return [f"class {i}" for i in range(num_classes)]
