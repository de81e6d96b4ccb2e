"""Cutting any network into stages at named layers, with torch.fx.

The network is traced once into a graph of operations, each remembering the modules it ran inside.
A cut "after layer NAME" sits after the last operation inside NAME; it is possible only where one
value alone flows past it (the layer's output): a skip connection, or an input read again later,
crossing the cut makes it impossible, and the refusal names the layer and what crosses. Each stage
is its own small GraphModule holding only its operations, so a staged run really stops; the
parameters are the original model's (shared, not copied).

The model's own classifier is the last Linear the graph calls; the last stage ends at its input
(pooling included), so the last exit is the network's own head on a (batch, channels) vector.
"""
from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

CONST_OPS = ("get_attr",)


# torch.fx's tracer swaps `nn.Module.__call__` and `__getattr__` for the whole process while it
# traces. Traces take turns (two at once could each restore the other's swap and leave it in place
# for good), and a module another thread runs meanwhile (the app's live stream, a retraining) is
# passed straight through: without that, its call became part of the trace or failed ("module is
# not installed as a submodule", tests/test_cut_threads.py).
_TRACE_LOCK = threading.Lock()


class _Tracer(fx.Tracer):
    """torch.fx's tracer that also keeps timm's untraceable modules and functions whole (when timm is
    imported), as timm's own feature extraction does, and leaves other threads' modules alone."""

    def __init__(self):
        leaves, functions = _timm_notrace()
        super().__init__(autowrap_functions=tuple(functions))
        self._leaves = tuple(leaves)
        self._thread = threading.get_ident()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (bool(self._leaves) and isinstance(m, self._leaves)) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if threading.get_ident() != self._thread:  # another thread's module: run it as it is
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val, parameter_proxy_cache: dict):
        if threading.get_ident() != self._thread:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


def _timm_notrace() -> tuple[list, list]:
    import sys
    if "timm" not in sys.modules:  # only a timm model needs timm's lists, and then timm is imported
        return [], []
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # an older timm without these helpers: trace everything
        return [], []
    return list(get_notrace_modules()), list(get_notrace_functions())


def trace(model: nn.Module, what: str) -> fx.GraphModule:
    """`model` (in eval mode) as a torch.fx graph. Raises ValueError naming `what` when it cannot be traced."""
    was = model.training
    model.eval()
    try:
        with _TRACE_LOCK:
            graph = _Tracer().trace(model, concrete_args=_defaults(model))
    except Exception as err:  # noqa: BLE001 - fx raises many kinds (TraceError, TypeError, assertion errors)
        raise ValueError(f"cannot cut {what}: torch.fx cannot trace it ({' '.join(str(err).split())[:200]}); "
                         "cut it at the children of an nn.Sequential instead") from err
    finally:
        model.train(was)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for p in placeholders[1:]:
        if not _drop_guards(graph, p):
            raise ValueError(f"cannot cut {what}: its forward reads the argument {p.target!r} besides the image")
    return fx.GraphModule(model, graph)


def _drop_guards(graph: fx.Graph, arg: fx.Node) -> bool:
    """Remove a defaulted argument and the checks fx made of it (`_assert_is_none`, ...); False when
    the computation itself reads it."""
    found, todo = [arg], [arg]
    while todo:
        for u in todo.pop().users:
            if u.op == "output":
                return False
            if u not in found:
                found.append(u)
                todo.append(u)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(found, key=order.__getitem__, reverse=True):
        graph.erase_node(n)
    return True


def _defaults(model: nn.Module) -> dict | None:
    """The forward's arguments after the image that have defaults, fixed at them (a ViT's attn_mask=None)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    fixed = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return fixed or None


def scopes(node: fx.Node) -> list[str]:
    """The qualified names of the modules `node` ran inside, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    names = [v[0] if isinstance(v, tuple) else str(k) for k, v in stack.items()]
    if node.op == "call_module" and node.target not in names:
        names.append(str(node.target))
    return names


class Graph:
    """A traced network with the facts cutting needs: node order, constant nodes, last uses."""

    def __init__(self, gm: fx.GraphModule, what: str):
        self.gm, self.what = gm, what
        self.nodes = list(gm.graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.input = self.nodes[0]
        self.output = self.nodes[-1]
        self.const: set[fx.Node] = set()
        for n in self.nodes:  # values that need no input: copied into every stage that reads them
            if n.op in CONST_OPS or (n.op.startswith("call_") and n.all_input_nodes
                                     and all(a in self.const for a in n.all_input_nodes)):
                self.const.add(n)
        self.last_use = {n: max((self.pos[u] for u in n.users), default=self.pos[n]) for n in self.nodes}

    def crossing(self, cut: fx.Node) -> list[fx.Node]:
        """Values other than `cut` computed at or before it and still needed after it."""
        i = self.pos[cut]
        return [n for n in self.nodes[:i + 1] if n is not cut and n not in self.const and self.last_use[n] > i]

    def node_after(self, layer: str) -> fx.Node:
        """The last operation inside the module named `layer`. ValueError when there is none."""
        inside = [n for n in self.nodes if layer in scopes(n)]
        if not inside:
            raise ValueError(f"{self.what} has no layer named {layer!r} that its forward runs; "
                             f"`offramp layers {self.what}` lists the layers it can be cut at")
        return inside[-1]

    def check_cut(self, layer: str, node: fx.Node) -> None:
        """Refuse, naming `layer`, a cut that another value crosses (a skip connection)."""
        across = self.crossing(node)
        if across:
            first = across[0]
            name = (scopes(first) or [first.name])[-1] if first.op != "placeholder" else "the input image"
            raise ValueError(f"cannot cut {self.what} after {layer!r}: a skip connection crosses it (the output "
                             f"of {name!r} is still needed after it); choose a layer that `offramp layers "
                             f"{self.what}` lists")

    def classifier_node(self) -> fx.Node | None:
        """The model's own classifier: the last Linear the graph calls, when nothing but it and what
        follows it reads its input's value."""
        linears = [n for n in self.nodes if n.op == "call_module"
                   and isinstance(self.gm.get_submodule(str(n.target)), nn.Linear)]
        if not linears:
            return None
        head = linears[-1]
        feed = head.args[0]
        if not isinstance(feed, fx.Node) or feed in self.const or self.crossing(feed):
            return None
        return head


def _copy_into(g: fx.Graph, env: dict, node: fx.Node, graph: Graph) -> fx.Node:
    """`node` copied into `g` (its constant inputs first, on demand); its inputs must be in `env`."""
    def arg(a: fx.Node) -> fx.Node:
        if a not in env:
            assert a in graph.const, f"{a.name} is not available in this stage"
            env[a] = _copy_into(g, env, a, graph)
        return env[a]
    return g.node_copy(node, arg)


def subgraph(graph: Graph, start: fx.Node, end: fx.Node, *, nhwc_in: bool = False,
             nhwc_out: bool = False) -> fx.GraphModule:
    """The operations after `start` up to and including `end`, as a module taking `start`'s value.

    `nhwc_in` / `nhwc_out`: the value at that end is channels-last (batch, h, w, channels) inside the
    model; the stage takes / gives it as a (batch, channels, h, w) map, as exit heads read maps.
    """
    g = fx.Graph()
    x = g.placeholder("x")
    if nhwc_in:
        x = g.call_method("contiguous", (g.call_method("permute", (x, 0, 2, 3, 1)),))
    env = {start: x}
    for n in graph.nodes[graph.pos[start] + 1: graph.pos[end] + 1]:
        if n not in graph.const and n not in env:
            env[n] = _copy_into(g, env, n, graph)
    out = env[end] if end is not start else x
    if nhwc_out:
        out = g.call_method("permute", (out, 0, 3, 1, 2))
    g.output(out)
    g.lint()
    stage = fx.GraphModule(graph.gm, g)
    for name, value in list(stage.named_buffers(recurse=False)):
        if name.startswith("_tensor_constant"):  # a value the trace took from the code (a mask), not a weight
            stage.register_buffer(name, value, persistent=False)
    return stage


# -- probing: shapes and FLOPs of every operation -----------------------------------------------
@dataclass
class Probe:
    """What one run on an example image gave: each node's output shape (None: not one tensor), the
    FLOPs of everything up to and including each node, and the model's output."""

    shapes: dict
    flops: dict
    output: torch.Tensor


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode):
        super().__init__(gm)
        self.counter, self.shapes, self.flops = counter, {}, {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        self.shapes[n] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        self.flops[n] = float(self.counter.get_total_flops())
        return out


@torch.no_grad()
def probe(graph: Graph, x: torch.Tensor) -> Probe:
    """Run the traced model on `x` once, recording every node's output shape and cumulative FLOPs."""
    was = graph.gm.training
    graph.gm.eval()
    counter = FlopCounterMode(display=False)
    recorder = _Recorder(graph.gm, counter)
    try:
        with counter:
            out = recorder.run(x)
    finally:
        graph.gm.train(was)
    return Probe(recorder.shapes, recorder.flops, out)


def candidate_layers(graph: Graph, found: Probe, max_depth: int) -> list[tuple[str, tuple, float]]:
    """(layer name, output shape without the batch, FLOPs up to it) of every module at most
    `max_depth` names deep (layer1.0 is 2 deep) that the network can be cut after, in order; of
    layers that end together (layer1 and layer1.1) the outermost."""
    seen: dict[str, fx.Node] = {}
    for n in graph.nodes:
        for name in scopes(n):
            if name and name.count(".") < max_depth:
                seen[name] = n  # the last node inside it
    ends: dict[fx.Node, str] = {}
    for name, n in seen.items():
        if n not in ends or name.count(".") < ends[n].count("."):
            ends[n] = name
    head = graph.classifier_node()
    limit = graph.pos[head.args[0]] if head is not None else len(graph.nodes)
    out = []
    for n, name in sorted(ends.items(), key=lambda kv: graph.pos[kv[0]]):
        shape = found.shapes.get(n)
        if graph.pos[n] < limit and shape is not None and not graph.crossing(n) and n not in graph.const:
            out.append((name, shape[1:], found.flops[n]))
    return out
