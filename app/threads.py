"""Thread plumbing shared by the workers: starting a worker's QThread, stopping it without
QThread.terminate(), a registry of the threads started (tests check none is left running), and
the one-frame mailbox between capture and inference."""
from __future__ import annotations

import os
import sys
import threading
import weakref
from typing import Any

from PySide6.QtCore import QObject, QThread

_THREADS: "weakref.WeakSet[QThread]" = weakref.WeakSet()


def running_threads() -> list[QThread]:
    """QThreads started through `start_worker` that are still running (tests check this is empty)."""
    return [t for t in list(_THREADS) if t.isRunning()]


def start_worker(worker: QObject, name: str) -> QThread:
    """Move `worker` to a new QThread named `name` and start its `run` loop there."""
    thread = QThread()
    thread.setObjectName(name)
    worker.moveToThread(thread)
    thread.started.connect(worker.run)
    _THREADS.add(thread)
    thread.start()
    return thread


def stop_worker(worker: QObject, thread: QThread, timeout_ms: int = 10000) -> bool:
    """Ask `worker` to stop and wait for its thread; False if it is still running after `timeout_ms`."""
    worker.stop()
    thread.quit()
    return thread.wait(timeout_ms)


def lower_thread_priority(step: int = 5) -> None:
    """Make the calling thread nicer than the GUI thread (Linux: nice is per thread).

    On a busy two-core machine the window's thread then wins the CPU whenever it has something
    to draw, instead of waiting behind capture and inference; elsewhere this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + step)
    except OSError:
        pass


def finish_thread() -> None:
    # quit() before the thread's event loop starts makes exec() return at once, so a finished
    # run() ends its thread without help from the GUI thread's event loop
    QThread.currentThread().quit()


class FrameSlot:
    """A one-frame mailbox between two threads: put() replaces what is waiting (newest wins).

    `generation` counts the clear() calls: a frame taken before a clear (an older source's) is of an
    older generation than the slot's, so its result, arriving late, can be told apart and dropped."""

    def __init__(self):
        self._cond = threading.Condition()
        self._item: Any = None
        self._item_generation = 0
        self.generation = 0
        self.dropped = 0  # frames replaced before anyone took them

    def put(self, item: Any) -> None:
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._item, self._item_generation = item, self.generation
            self._cond.notify_all()

    def take(self, timeout: float) -> Any:
        """The waiting frame (emptying the slot), or None after `timeout` seconds."""
        return self.take_tagged(timeout)[0]

    def take_tagged(self, timeout: float) -> tuple[Any, int]:
        """(the waiting frame or None after `timeout` seconds, the generation it was put in)."""
        with self._cond:
            if self._item is None:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            self._cond.notify_all()
            return item, self._item_generation

    def wait_empty(self, timeout: float) -> bool:
        """Wait until the waiting frame was taken; True when the slot is empty."""
        with self._cond:
            return self._cond.wait_for(lambda: self._item is None, timeout)

    def has_frame(self) -> bool:
        with self._cond:
            return self._item is not None

    def clear(self) -> None:
        """Drop the waiting frame and start a new generation (a new source)."""
        with self._cond:
            self._item = None
            self.generation += 1
            self._cond.notify_all()
