"""engine.backbones.cut traces with torch.fx, whose tracer swaps `nn.Module.__call__` and
`__getattr__` for the whole process while it traces: modules other threads run meanwhile (a live
stream, a retraining) must still compute their own outputs, and two traces at once must leave
`nn.Module` as it was."""
from __future__ import annotations

import threading

import torch
from torch import nn

from engine.backbones import cut


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def test_modules_run_by_other_threads_while_a_model_is_traced():
    torch.manual_seed(0)
    traced, running = _Net().eval(), _Net().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = running(x)
    stop, failures, runs = threading.Event(), [], [0]

    def run():
        while not stop.is_set():
            try:
                with torch.no_grad():
                    got = running(x)
                if not (isinstance(got, torch.Tensor) and torch.allclose(got, want)):
                    failures.append(f"another output: {type(got).__name__}")
            except Exception as err:  # noqa: BLE001 - what a trace does to this thread is the finding
                failures.append(f"{type(err).__name__}: {err}")
            runs[0] += 1

    workers = [threading.Thread(target=run) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        for _ in range(30):
            cut.trace(traced, "the test's network")
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert runs[0] > 0 and not failures, failures[:3]


def test_two_traces_at_once_leave_nn_module_as_it_was():
    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    nets = [_Net().eval() for _ in range(3)]
    threads = [threading.Thread(target=lambda n=n: [cut.trace(n, "a network") for _ in range(10)]) for n in nets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert nn.Module.__call__ is call and nn.Module.__getattr__ is getattr_
