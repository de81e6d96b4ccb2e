"""Work that must not run on the GUI thread: reading frames, running the engine, long engine work.

Each worker is a QObject moved to its own QThread; its `run` loop starts with the thread. A worker
is asked to stop (a flag it checks) and its thread is waited for; nothing here calls
QThread.terminate(). Frames pass from capture to inference through a `FrameSlot` that holds one
frame: a new frame replaces an unread one, so when inference lags the newest frame wins and
nothing queues up.

A failure in a worker reaches the window as one sentence (its `error` signal); the exception and
its traceback go to the log (`log.exception`), where `offramp-app --log-file` keeps them.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

from PySide6.QtCore import QObject, Signal

from .dataset import DatasetError, FolderWriter
from .sources import Frame, SourceError, SourceSpec, open_source
from .state import ModelInfo
from .threads import FrameSlot, finish_thread, lower_thread_priority, running_threads, start_worker, stop_worker

__all__ = ["CaptureWorker", "FrameSlot", "FrameWriter", "InferenceWorker", "TaskWorker", "running_threads",
           "start_worker", "stop_worker"]


log = logging.getLogger(__name__)

REFERENCE_EVERY = 10  # frames between live timings of the full model


class CaptureWorker(QObject):
    """Reads frames from a source into a FrameSlot at the chosen pace.

    A live camera is read as fast as it delivers (newest wins in the slot). Files are read at
    `pace` seconds per frame, or with pace 0 as fast as inference takes them (one frame ahead,
    so no decoding is wasted on frames nobody sees).
    """

    opened = Signal(object)  # dict: kind, count, interval, live, seekable
    position = Signal(int, int, str)  # index, count (-1 = live), name
    ended = Signal()
    skipped = Signal(str, str)  # a file of a slideshow that cannot be read (left out, once), why
    error = Signal(str)
    finished = Signal()

    def __init__(self, spec: SourceSpec, slot: FrameSlot, *, pace: float | None = None, mirror: bool = False,
                 loop: bool = False):
        super().__init__()
        self.spec, self.slot, self.loop = spec, slot, loop
        self._cond = threading.Condition()
        self._stop = False
        self._paused = False
        self._ended = False  # reached the end: playing again starts from the first frame
        self._pace = pace  # None = the source's own pace (video fps, 1 s per image)
        self._mirror = mirror
        self._seek: int | None = None
        self._single = False  # deliver one frame while paused (stepping)
        self._last_index = -1

    # -- control, from any thread ---------------------------------------------------------------
    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def set_paused(self, paused: bool) -> None:
        with self._cond:
            if not paused and self._ended:
                self._seek, self._ended = 0, False
            self._paused = paused
            self._cond.notify_all()

    def set_pace(self, seconds: float | None) -> None:
        with self._cond:
            self._pace = seconds
            self._cond.notify_all()

    def set_mirror(self, mirror: bool) -> None:
        with self._cond:
            self._mirror = mirror

    def step(self, delta: int) -> None:
        """Show the frame `delta` away from the current one (also while paused)."""
        with self._cond:
            self._seek, self._single = max(0, self._last_index + delta), True
            self._cond.notify_all()

    def seek(self, index: int) -> None:
        with self._cond:
            self._seek, self._single = max(0, index), True
            self._cond.notify_all()

    # -- the loop, in the worker thread -----------------------------------------------------------
    def run(self) -> None:
        lower_thread_priority()
        source = None
        try:
            source = open_source(self.spec, loop=self.loop)
            self.opened.emit({"kind": self.spec.kind, "count": source.count, "interval": source.interval,
                              "live": source.live, "seekable": source.seekable})
            self._loop(source)
        except SourceError as e:
            log.info("%s", e)  # the user's to fix (a missing file, a busy camera): no traceback
            self.error.emit(str(e))
        except Exception as e:  # noqa: BLE001 - a capture fault must reach the window, not kill the app
            log.exception("reading %s failed", self.spec.display)
            self.error.emit(f"reading {self.spec.display} failed: {e}")
        finally:
            if source is not None:
                source.close()
            self.finished.emit()
            finish_thread()

    def _loop(self, source) -> None:
        default_pace = source.interval if self.spec.kind == "video" else 1.0
        next_due = time.perf_counter()
        told = 0  # of source.skipped
        while True:
            with self._cond:
                if self._stop:
                    return
                if self._paused and not self._single:
                    self._cond.wait(0.2)
                    continue
                seek, single, self._seek, self._single = self._seek, self._single, None, False
                pace = default_pace if self._pace is None else self._pace
                mirror = self._mirror
                if not single and not source.live and pace > 0:
                    wait = next_due - time.perf_counter()
                    if wait > 0:
                        self._cond.wait(min(wait, 0.2))
                        continue
            if not single and not source.live and pace <= 0 and not self.slot.wait_empty(0.1):
                continue  # full speed for files: read the next frame once the last one was taken
            if seek is not None and source.seekable:
                source.seek(seek)
            frame = source.read()
            skipped = getattr(source, "skipped", ())
            for path, why in skipped[told:]:  # before the frame: a window showing it knows what was left out
                log.info("skipped %s", why)
                self.skipped.emit(path, why)
            told = len(skipped)
            if frame is None:
                with self._cond:
                    self._paused = self._ended = True
                self.ended.emit()
                continue
            if mirror:
                frame = Frame(frame.image[:, ::-1].copy(), frame.index, frame.count, frame.name, frame.time)
            self._last_index = frame.index
            with self._cond:  # after stop() returns, this worker never touches the slot again
                if self._stop:
                    return
                self.slot.put(frame)
            self.position.emit(frame.index, -1 if frame.count is None else frame.count, frame.name)
            next_due = max(next_due + pace, time.perf_counter()) if pace > 0 else time.perf_counter()


class InferenceWorker(QObject):
    """Owns the Engine; runs `Engine.infer` on the newest frame in its own thread.

    This thread is the one owner of the engine and what serialises its use: commands (load a
    bundle, change device, policy or thresholds, run the last frame again) are queued from any
    thread and run here between frames, so the engine is only ever touched here, one call at a
    time. Nothing else may call `self.engine` (read `ModelInfo`, made here, instead).
    """

    started = Signal()
    progress = Signal(str)  # what it is busy with ("loading bundle …")
    model_loaded = Signal(object)  # ModelInfo
    device_changed = Signal(object)  # ModelInfo (same bundle, new device and latency profile)
    runtime_changed = Signal(object)  # ModelInfo (same bundle, the runtime now running it and its profile)
    # InferenceResult (None when no model is loaded), Frame, whether it re-ran the last frame (a setting
    # changed: not a new frame), the FrameSlot generation the frame came from (an older one: a closed source)
    result = Signal(object, object, bool, int)
    load_failed = Signal(str)  # a load ended without a new model (also said through `error`)
    error = Signal(str)
    finished = Signal()

    def __init__(self, slot: FrameSlot, engine_factory: Callable[..., Any] | None = None,
                 threads: int | None = None):
        super().__init__()
        self.slot = slot
        self.threads = threads
        self._factory = engine_factory
        self._commands: "queue.Queue[Callable[[], None]]" = queue.Queue()
        self._stop = threading.Event()
        self.engine = None
        self._path = ""
        self._last: Frame | None = None
        self._last_generation = 0
        self._last_error = ""

    def stop(self) -> None:
        self._stop.set()

    # -- commands (any thread) --------------------------------------------------------------------
    def load(self, bundle: Any, device: str = "auto", path: str = "", fallback: bool = True,
             runtime: str = "torch") -> None:
        """Load a bundle (path or Bundle); on failure the current engine is kept. With `fallback`, a
        device this machine lacks is reported and the best available one used instead. A `runtime`
        that cannot run it is reported and the model runs torch."""
        self._commands.put(lambda: self._load(bundle, device, path, fallback, runtime))

    def set_device(self, device: str) -> None:
        self._commands.put(lambda: self._set_device(device))

    def set_runtime(self, runtime: str) -> None:
        """Run the model with `runtime` ("torch", "onnxruntime"): `Engine.set_runtime`, here."""
        self._commands.put(lambda: self._set_runtime(runtime))

    def set_policy(self, policy: Any, weights_of: str | None = None) -> None:
        """A policy name of the bundle, or a policy JSON dict (built here, against the model); a learned
        policy's JSON keeps the tensors of the bundle's policy `weights_of` (its JSON holds none)."""
        self._commands.put(lambda: self._set_policy(policy, weights_of))

    def set_thresholds(self, thresholds: list) -> None:
        ts = list(thresholds)
        self._commands.put(lambda: self._guard("changing thresholds", lambda e: e.set_thresholds(ts)))

    def rerun(self) -> None:
        """Run the last frame again (after a change, when the source is paused or a still)."""
        self._commands.put(lambda: None)  # every command ends in one run of the last frame

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        lower_thread_priority()
        self.started.emit()
        if self.threads:
            self._set_threads(self.threads)
        try:
            while not self._stop.is_set():
                self._run_commands()
                frame, generation = self.slot.take_tagged(timeout=0.05)
                if frame is not None:
                    self._infer(frame, generation)
                    time.sleep(0)  # hand the GIL to the GUI thread between frames
        finally:
            self.finished.emit()
            finish_thread()

    def _set_threads(self, threads: int) -> None:
        """torch's intra-op threads for the process. A count torch refuses (or a broken torch) is said
        through `error` and torch keeps its own count: an exception here would end this thread, and
        the window would wait for frames that never come."""
        try:
            # one frame at a time gains nothing from intra-op threads, and on a busy machine their
            # spin-waiting costs more than the work (and starves the GUI and capture threads)
            import torch
            torch.set_num_threads(threads)
        except Exception as e:  # noqa: BLE001 - RuntimeError for a count below 1; ImportError
            log.exception("cannot set %s torch threads", threads)
            self.error.emit(f"cannot run torch with {threads} threads ({e}); it keeps its default")

    def _run_commands(self) -> None:
        ran = False
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            try:
                command()
            except Exception as e:  # noqa: BLE001 - e.g. a broken torch install met on first import
                log.exception("a command of the inference worker failed")
                self.error.emit(f"{e.__class__.__name__}: {e}")
            ran = True
        if ran:  # once after a burst of slider moves, not once per move
            self._rerun()

    def _infer(self, frame: Frame, generation: int, rerun: bool = False) -> None:
        self._last, self._last_generation = frame, generation
        if self.engine is None:
            self.result.emit(None, frame, rerun, generation)
            return
        try:
            res = self.engine.infer(frame.image)
        except Exception as e:  # noqa: BLE001 - reported once, the loop goes on with the next frame
            message = f"inference failed on {frame.name}: {e}"
            if message != self._last_error:  # once, like the message, not once per frame
                log.exception("%s", message)
                self.error.emit(message)
            self._last_error = message
            self.result.emit(None, frame, rerun, generation)
            return
        self._last_error = ""
        self.result.emit(res, frame, rerun, generation)

    def _rerun(self) -> None:
        if self._last is not None and not self.slot.has_frame():  # a waiting frame shows the change anyway
            self._infer(self._last, self._last_generation, rerun=True)

    def _guard(self, what: str, fn: Callable[[Any], Any]) -> bool:
        """Run fn(engine); report a failure (the engine keeps its old setting) and return False."""
        if self.engine is None:
            self.error.emit(f"{what}: no model is loaded")
            return False
        try:
            fn(self.engine)
        except Exception as e:  # noqa: BLE001 - a bad setting is reported; the engine keeps its old one
            log.exception("%s failed", what)
            self.error.emit(f"{what} failed: {e}")
            return False
        return True

    def _make_engine(self, bundle: Any, device: str):
        if self._factory is not None:
            return self._factory(bundle, device=device)
        from engine.runtime import Engine  # torch loads here, off the GUI thread
        # every REFERENCE_EVERY-th frame the full model runs once too, so "ms saved" compares
        # timings taken under the same live conditions
        return Engine(bundle, device=device, reference_every=REFERENCE_EVERY)

    def _load(self, bundle: Any, device: str, path: str, fallback: bool, runtime: str = "torch") -> None:
        if bundle is None:  # the built-in default
            from engine.bundle import default_bundle_path
            bundle = path = str(default_bundle_path())
            if not Path(path).is_file():
                self._load_failed(f"no built-in model at {path}; load a bundle with Model ▸ Load bundle…")
                return
        from engine.bundle import BundleError
        shown = path or "the retrained model"
        self.progress.emit(f"loading {shown} …")
        try:
            try:
                engine = self._make_engine(bundle, device)
            except ValueError as e:  # a device this machine lacks (e.g. remembered from another one)
                if not fallback or device == "auto" or isinstance(e, BundleError):
                    raise
                log.info("device %r cannot be used (%s): loading on the best device here", device, e)
                self.error.emit(f"device {device!r} cannot be used ({e}); loading on the best device here instead")
                engine = self._make_engine(bundle, "auto")
            if runtime != "torch" and getattr(engine, "runtime_name", "torch") != runtime:
                try:
                    self.progress.emit(f"preparing the {runtime} runtime …")
                    engine.set_runtime(runtime)
                except Exception as e:  # noqa: BLE001 - the model runs torch; said once
                    log.exception("the %s runtime cannot run %s", runtime, shown)
                    self.error.emit(f"{e} (running torch)")
            info = ModelInfo.from_engine(engine, path)
        except (BundleError, FileNotFoundError) as e:  # the user's to fix (a damaged or missing file): no traceback
            log.info("%s", _load_message(shown, e))
            log.debug("loading %s failed", shown, exc_info=True)
            self._load_failed(_load_message(shown, e))
            return
        except Exception as e:  # noqa: BLE001 - anything else: the old model stays
            log.exception("could not load %s", shown)
            self._load_failed(_load_message(shown, e))
            return
        self.engine, self._path = engine, path
        self.model_loaded.emit(info)

    def _load_failed(self, message: str) -> None:
        self.load_failed.emit(message)
        self.error.emit(message)

    def _set_device(self, device: str) -> None:
        self.progress.emit(f"moving the model to {device} …")
        if self._guard(f"switching to device {device}", lambda e: e.set_device(device)):
            self.device_changed.emit(ModelInfo.from_engine(self.engine, self._path))

    def _set_runtime(self, runtime: str) -> None:
        self.progress.emit(f"preparing the {runtime} runtime …")
        self._guard(f"switching to the {runtime} runtime", lambda e: e.set_runtime(runtime))
        if self.engine is not None:  # also after a failure: the menu shows what runs
            self.runtime_changed.emit(ModelInfo.from_engine(self.engine, self._path))

    def _set_policy(self, policy: Any, weights_of: str | None) -> None:
        if isinstance(policy, dict) and self.engine is not None:
            try:
                from engine.policies import policy_from_json
                model = self.engine.model
                policy = policy_from_json(policy, num_exits=model.num_exits, num_classes=model.num_classes)
                if weights_of is not None:
                    policy.load_state_dict(self.engine.bundle.policies[weights_of].state_dict())
            except Exception as e:  # noqa: BLE001
                log.exception("cannot build the policy %s", policy)
                self.error.emit(f"cannot build the policy {policy}: {e}")
                return
        self._guard("changing the policy", lambda e: e.set_policy(policy))


def _load_message(shown: str, e: Exception) -> str:
    """Why `shown` did not load, in one sentence that names it once (a BundleError names it itself)."""
    return f"could not load the bundle: {e}" if shown in str(e) else f"could not load {shown}: {e}"


class TaskWorker(QObject):
    """Runs `fn(progress=..., cancel=...)` (long engine work) once in its own thread.

    Emits progress (engine.progress.Progress, at most ~20 per second plus every stage change),
    then exactly one of result / cancelled / error, then finished.
    """

    started = Signal()
    progress = Signal(object)
    result = Signal(object)
    cancelled = Signal()
    error = Signal(str)
    finished = Signal()

    def __init__(self, fn: Callable[..., Any], what: str):
        super().__init__()
        from engine.progress import CancelFlag
        self.fn, self.what = fn, what
        self.cancel_flag = CancelFlag()
        self._last_emit = 0.0
        self._last_stage = None

    def stop(self) -> None:
        self.cancel_flag.set()

    cancel = stop

    def _on_progress(self, p) -> None:
        now = time.perf_counter()
        if p.stage != self._last_stage or p.done >= p.total or now - self._last_emit > 0.05:
            self._last_emit, self._last_stage = now, p.stage
            self.progress.emit(p)

    def run(self) -> None:
        from engine.progress import Cancelled
        lower_thread_priority()
        self.started.emit()
        try:
            out = self.fn(progress=self._on_progress, cancel=self.cancel_flag)
        except Cancelled:
            self.cancelled.emit()
        except Exception as e:  # noqa: BLE001 - every failure becomes a message in the window
            log.exception("%s failed", self.what)
            self.error.emit(f"{self.what} failed: {e}")
        else:
            self.result.emit(out)
        finally:
            self.finished.emit()
            finish_thread()


class FrameWriter(QObject):
    """Saves frames into a dataset folder (`app.dataset`), in the order given, in its own thread:
    a PNG takes 30-200 ms to encode and a USB stick or network share can stall for longer, which
    the window must never wait for. Every `put` that returns True ends in one `saved` or `failed`.
    Asked to stop, it first writes what is queued: a capture just before quitting is kept."""

    saved = Signal(str, str)  # file written, class
    failed = Signal(str)  # one sentence naming the class or folder
    finished = Signal()
    QUEUE = 32  # frames waiting at most (a 1080p frame is 6 MB); beyond that `put` refuses

    def __init__(self):
        super().__init__()
        self._queue: "queue.Queue[tuple]" = queue.Queue(maxsize=self.QUEUE)
        self._stop = threading.Event()
        self._files = FolderWriter()

    def stop(self) -> None:
        self._stop.set()

    def put(self, image: Any, folder: str, cls: str, suffix: str) -> bool:
        """Queue one (h, w, 3) BGR frame for FOLDER/CLASS/; False (nothing queued) when the queue is full."""
        try:
            self._queue.put_nowait((image, folder, cls, suffix))
        except queue.Full:
            return False
        return True

    def run(self) -> None:
        lower_thread_priority()
        try:
            while True:
                try:
                    item = self._queue.get(timeout=0.05)
                except queue.Empty:
                    if self._stop.is_set():
                        return
                    continue
                self._write(*item)
        finally:
            self.finished.emit()
            finish_thread()

    def _write(self, image: Any, folder: str, cls: str, suffix: str) -> None:
        try:
            path = self._files.write(image, folder, cls, suffix)
        except DatasetError as e:
            log.info("%s", e)  # the user's to fix (a bad class name, a full disk): no traceback
            self.failed.emit(str(e))
        except Exception as e:  # noqa: BLE001 - a failed save is reported; the live view goes on
            log.exception("saving a frame into %s failed", folder)
            self.failed.emit(f"saving a frame into {folder} failed: {e}")
        else:
            self.saved.emit(str(path), cls)
