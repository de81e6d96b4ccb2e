"""The Qt-side controller: owns the capture and inference workers and the long-running tasks, keeps
the plain-Python state (`ModelInfo`, `PolicyState`, `RunningTotals`) and tells the widgets through
signals. Widgets receive the session in `__init__` and subscribe to it; they never touch threads.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from PySide6.QtCore import QObject, QThread, Signal

from .sources import SourceError, SourceSpec
from .state import ModelInfo, PolicyState, counted
from .stats import shown_totals
from .workers import CaptureWorker, FrameSlot, FrameWriter, InferenceWorker, TaskWorker, start_worker, stop_worker

log = logging.getLogger(__name__)


class Session(QObject):
    model_loaded = Signal(object)  # ModelInfo
    device_changed = Signal(str)
    runtime_changed = Signal(str)  # "torch", "onnxruntime": what runs the model now
    policy_changed = Signal(object)  # PolicyState
    result = Signal(object, object)  # InferenceResult | None, Frame
    source_opened = Signal(object)  # SourceSpec
    source_info = Signal(object)  # dict from CaptureWorker.opened
    source_position = Signal(int, int, str)
    source_ended = Signal()
    source_skipped = Signal(str, str)  # a slideshow file that cannot be read (left out), why
    source_failed = Signal(str)
    paused_changed = Signal(bool)
    loading = Signal(str)  # a bundle started loading (what, for display)
    load_failed = Signal(str)  # … and ended without a new model (the old one, if any, stays)
    frame_saved = Signal(str, str)  # file written by save_frame, class
    save_failed = Signal(str)  # why a frame given to save_frame was not written (also sent to `error`)
    status = Signal(str)
    error = Signal(str)

    def __init__(self, device: str = "auto", engine_factory: Callable[..., Any] | None = None,
                 threads: int | None = None, parent: QObject | None = None):
        """`threads`: torch intra-op threads for the whole process (None = leave torch's default)."""
        super().__init__(parent)
        self.device = device
        self.runtime = "torch"  # what runs the model (engine.runtime.RUNTIMES); used by the next load too
        self.info: ModelInfo | None = None
        self.policy: PolicyState | None = None
        self.stats = shown_totals()  # over the frames shown (a re-run replaces its frame), with latency percentiles
        self.spec: SourceSpec | None = None
        self.paused = False
        self.pace: float | None = None  # seconds per frame for files; None = the source's own
        self.mirror = False
        self.loop = True  # folders and videos start again at the end
        self.resolution: tuple[int, int] | None = None
        self.skipped: list[tuple[str, str]] = []  # (file, why) left out of the open slideshow as unreadable
        self._slot = FrameSlot()
        self._capture: tuple[CaptureWorker, QThread] | None = None
        self._stopping: list[tuple[CaptureWorker, QThread]] = []  # capture workers asked to stop
        self._tasks: list[tuple[TaskWorker, QThread]] = []
        self._writer: tuple[FrameWriter, QThread] | None = None  # started by the first save_frame
        self._last_save_error = ""
        self._inference = InferenceWorker(self._slot, engine_factory, threads)
        self._inference.model_loaded.connect(self._on_model_loaded)
        self._inference.device_changed.connect(self._on_device_changed)
        self._inference.runtime_changed.connect(self._on_runtime_changed)
        self._inference.result.connect(self._on_result)
        self._inference.load_failed.connect(self.load_failed)
        self._inference.error.connect(self.error)
        self._inference.progress.connect(self.status)
        self._inference_thread = start_worker(self._inference, "offramp-inference")
        self._closed = False

    # -- model ------------------------------------------------------------------------------------
    def load_bundle(self, bundle: Any, path: str = "", fallback: bool = True) -> None:
        """Load a bundle file, an in-memory Bundle, or None for the built-in default; the current
        model stays until the new one has loaded. `fallback`: on a device this machine lacks, say so
        and use the best one here (a scripted run fails instead)."""
        path = path or (str(bundle) if isinstance(bundle, (str, Path)) else "")
        self.loading.emit(Path(path).name if path else ("the built-in model" if bundle is None else "the new model"))
        self._inference.load(bundle, self.device, path, fallback, self.runtime)

    def set_device(self, device: str) -> None:
        if self.info is None:
            self.device = device  # used by the next load
            self.device_changed.emit(device)
            return
        self._inference.set_device(device)

    def set_runtime(self, runtime: str) -> None:
        """Run the model with `runtime` ("torch", "onnxruntime"), queued to the inference thread
        like a device change; before a model loads, the next load uses it."""
        if self.info is None:
            self.runtime = runtime
            self.runtime_changed.emit(runtime)
            return
        self._inference.set_runtime(runtime)

    def _on_model_loaded(self, info: ModelInfo) -> None:
        self.info, self.device, self.runtime = info, info.device, info.runtime
        self.policy = PolicyState(info)
        self.stats.reset(info.num_exits)
        # said first: what the window says about the model (e.g. its remembered policy) then stays
        self.status.emit(f"model {info.name} loaded on {info.device}: {counted(len(info.class_names), 'class')}, "
                         f"{counted(info.num_exits, 'exit')}")
        self.model_loaded.emit(info)
        self.policy_changed.emit(self.policy)
        self._inference.rerun()

    def _on_device_changed(self, info: ModelInfo) -> None:
        if self.info is not None:  # onnxruntime runs on the CPU only: another device may change the runtime
            self.info.device, self.info.full_ms = info.device, info.full_ms
            self.info.runtime, self.info.runtimes = info.runtime, info.runtimes
        self.device, self.runtime = info.device, info.runtime
        self.stats.reset()
        self.device_changed.emit(info.device)
        self.status.emit(f"running on {info.device}")

    def _on_runtime_changed(self, info: ModelInfo) -> None:
        changed = info.runtime != self.runtime
        if self.info is not None:
            self.info.full_ms, self.info.runtime, self.info.runtimes = info.full_ms, info.runtime, info.runtimes
        self.runtime = info.runtime
        if changed:
            self.stats.reset()  # the times so far are another runtime's
            self.status.emit(f"running with {info.runtime}")
        self.runtime_changed.emit(info.runtime)

    # -- policy -------------------------------------------------------------------------------------
    def choose_policy(self, name: str) -> None:
        if self.policy is None:
            return
        try:
            self.policy.choose(name)
        except ValueError as e:
            self.error.emit(str(e))
            return
        self._apply_policy()

    def set_threshold(self, exit_index: int, value: float | None) -> None:
        """One exit's threshold (None = off), with immediate effect on the live view."""
        if self.policy is None or not self.policy.is_threshold:
            return
        self._inference.set_thresholds(self.policy.set_threshold(exit_index, value))
        self.policy_changed.emit(self.policy)

    def choose_point(self, index: int) -> None:
        """Operating point `index` of the front the budget walks under the active policy (its own,
        else the bundle's, whose policy then becomes the active one)."""
        if self.policy is None or not self.policy.front:
            return
        try:
            self.policy.choose_point(index)
        except IndexError as e:
            self.error.emit(str(e))
            return
        self._apply_policy()

    def choose_budget(self, fraction: float) -> None:
        """The most accurate point of the front the budget walks within `fraction` of the full model's
        FLOPs (none fits: the cheapest), made active (`PolicyState.choose_budget`). Raises ValueError
        for a fraction outside (0, 1]; does nothing without a front."""
        if self.policy is None or not self.policy.front:
            return
        self.policy.choose_budget(fraction)
        self._apply_policy()

    def reset_policy(self) -> None:
        if self.policy is None:
            return
        self.policy.reset()
        self._apply_policy()

    def restore_policy(self, memory: dict) -> bool:
        """Make a remembered choice (`PolicyState.memory()`) active; False, and the bundle's default
        stays, when it does not fit the loaded bundle (e.g. the file was replaced)."""
        if self.policy is None:
            return False
        try:
            self.policy.restore(memory)
        except ValueError:
            fits = False
        else:
            fits = True
        self._apply_policy()
        return fits

    def _apply_policy(self) -> None:
        """Send the active policy to the engine and tell the widgets."""
        state = self.policy
        self._inference.set_policy(state.current if state.edited else state.name, state.weights_of)
        self.policy_changed.emit(state)

    def edited_bundle(self) -> Any:
        """The loaded bundle with the active configuration added as its default policy "edited"."""
        import dataclasses
        from engine.policies import policy_from_json
        info = self.info
        policy = policy_from_json(self.policy.current, num_exits=info.num_exits, num_classes=len(info.class_names))
        if self.policy.weights_of is not None:  # a learned policy's JSON holds no tensors: its bundle policy's
            policy.load_state_dict(info.bundle.policies[self.policy.weights_of].state_dict())
        name = "edited" if self.policy.edited else self.policy.name
        policies = {**info.bundle.policies, name: policy} if self.policy.edited else dict(info.bundle.policies)
        return dataclasses.replace(info.bundle, policies=policies, default_policy=name)

    # -- source ---------------------------------------------------------------------------------------
    def open_source(self, spec: SourceSpec | str) -> None:
        """Open a source (SourceSpec or text as SourceSpec.from_text takes); errors go to `error`."""
        try:
            spec = spec if isinstance(spec, SourceSpec) else SourceSpec.from_text(spec)
        except SourceError as e:
            self.source_failed.emit(str(e))
            self.error.emit(str(e))
            return
        if spec.kind == "camera" and self.resolution:
            spec = SourceSpec(spec.kind, spec.target, *self.resolution)
        self.close_source()
        self.spec = spec
        self.stats.reset()
        self.skipped = []
        worker = CaptureWorker(spec, self._slot, pace=self.pace, mirror=self.mirror,
                               loop=self.loop and spec.kind != "image")
        worker.opened.connect(self._on_source_info)
        worker.position.connect(self.source_position)
        worker.ended.connect(self._on_source_ended)
        worker.skipped.connect(self._on_source_skipped)
        worker.error.connect(self._on_source_error)
        self._capture = (worker, start_worker(worker, "offramp-capture"))
        self._set_paused(False)
        self.source_opened.emit(spec)
        self.status.emit(f"opening {spec.display} …")

    @property
    def source_open(self) -> bool:
        """A source is open: it plays, or is paused (False before the first, and after one failed)."""
        return self._capture is not None

    def close_source(self) -> None:
        """Stop the capture worker without waiting for it: a camera read can block for a while, and
        the window must not. After this returns the old worker puts no more frames in the slot."""
        if self._capture is not None:
            worker, thread = self._capture
            self._capture = None
            worker.stop()
            thread.quit()
            self._stopping.append((worker, thread))
            thread.finished.connect(self._on_capture_stopped)
            self._slot.clear()

    def _on_capture_stopped(self) -> None:
        self._stopping = [(w, t) for w, t in self._stopping if not t.isFinished()]

    def _on_source_info(self, info: dict) -> None:
        self.source_info.emit(info)
        count = f"{info['count']} frames" if info.get("count") else "live"
        if self.spec is not None:
            self.status.emit(f"playing {self.spec.display} ({count})")

    def _on_source_ended(self) -> None:
        self._set_paused(True)
        self.source_ended.emit()
        still = self.spec is not None and self.spec.kind == "image"
        self.status.emit("showing a still image: change thresholds to see their effect" if still
                         else "end of the source: paused (play starts it again)")

    def _on_source_skipped(self, path: str, why: str) -> None:
        if self._capture is None or self.sender() is not self._capture[0]:
            return  # a file of a source closed since
        self.skipped.append((path, why))
        self.source_skipped.emit(path, why)
        self.status.emit(f"skipped: {why} ({len(self.skipped)} unreadable so far)")

    def _on_source_error(self, message: str) -> None:
        if self._capture is None or self.sender() is not self._capture[0]:
            return  # a worker already replaced by another source: its fate no longer matters
        self.close_source()  # its worker has ended: no source is open now, and nothing can play
        self.source_failed.emit(message)
        self.error.emit(message)

    def _set_paused(self, paused: bool) -> None:
        self.paused = paused
        self.paused_changed.emit(paused)

    def set_paused(self, paused: bool) -> None:
        """Pause or play the open source; with none open (or the last one failed), say so instead."""
        if self._capture is None:
            self.status.emit("nothing to play: open an image, a folder, a video or a camera from the File menu")
            return
        self._capture[0].set_paused(paused)
        self._set_paused(paused)

    def toggle_pause(self) -> None:
        self.set_paused(not self.paused)

    def step(self, delta: int) -> None:
        if self._capture is not None:
            self._capture[0].step(delta)

    def seek(self, index: int) -> None:
        if self._capture is not None:
            self._capture[0].seek(index)

    def set_pace(self, seconds: float | None) -> None:
        self.pace = seconds
        if self._capture is not None:
            self._capture[0].set_pace(seconds)

    def set_mirror(self, mirror: bool) -> None:
        self.mirror = mirror
        if self._capture is not None:
            self._capture[0].set_mirror(mirror)

    # -- results ------------------------------------------------------------------------------------
    def _on_result(self, result: Any, frame: Any, rerun: bool, generation: int) -> None:
        if generation != self._slot.generation:
            return  # a frame of a source closed since: its result would describe what is gone
        if result is not None:
            self.stats.add(result, rerun=rerun)
        self.result.emit(result, frame)

    def reset_counters(self) -> None:
        self.stats.reset()

    @property
    def dropped_frames(self) -> int:
        """Frames captured but replaced by a newer one before inference took them."""
        return self._slot.dropped

    # -- saving frames into a dataset folder --------------------------------------------------------------
    def save_frame(self, image: Any, folder: str, cls: str, suffix: str = ".jpg") -> bool:
        """Write a (h, w, 3) BGR frame into FOLDER/CLASS/ in the writer thread; `frame_saved` or
        `save_failed` follows. False, and nothing follows, when the writer is that far behind."""
        if self._closed:
            return False
        if self._writer is None:
            worker = FrameWriter()
            worker.saved.connect(self._on_frame_saved)
            worker.failed.connect(self._on_save_failed)
            self._writer = (worker, start_worker(worker, "offramp-writer"))
        return self._writer[0].put(image, folder, cls, suffix)

    def _on_frame_saved(self, path: str, cls: str) -> None:
        self._last_save_error = ""
        self.frame_saved.emit(path, cls)

    def _on_save_failed(self, message: str) -> None:
        self.save_failed.emit(message)
        if message != self._last_save_error:  # a burst into a bad folder fails once per queued frame
            self.error.emit(message)
        self._last_save_error = message

    # -- long work ------------------------------------------------------------------------------------
    def start_task(self, fn: Callable[..., Any], what: str, **slots: Callable) -> TaskWorker:
        """Run `fn(progress=, cancel=)` in a worker thread. `slots` maps TaskWorker signal names
        (progress, result, cancelled, error, finished) to bound methods of QObjects living in the
        GUI thread; they are connected before the thread starts, so no signal is missed."""
        worker = TaskWorker(fn, what)
        for name, slot in slots.items():
            getattr(worker, name).connect(slot)
        worker.finished.connect(self._on_task_finished)
        self._tasks.append((worker, start_worker(worker, f"offramp-task-{what}")))
        return worker

    def _on_task_finished(self) -> None:
        worker = self.sender()
        for w, thread in list(self._tasks):
            if w is worker:
                thread.wait(5000)  # run() has returned; the thread ends right after
                self._tasks.remove((w, thread))

    # -- ending -----------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop every worker and wait for its thread (cancelling long work); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.close_source()
        for worker, thread in self._stopping:
            if not stop_worker(worker, thread):
                log.warning("the capture thread for %s did not stop in time", worker.spec.display)
                self.error.emit(f"the capture thread for {worker.spec.display} did not stop in time")
        self._stopping.clear()
        if self._writer is not None and not stop_worker(*self._writer, 30000):
            log.warning("the thread saving captured frames did not stop in time")
            self.error.emit("the thread saving captured frames did not stop in time")
        for worker, thread in self._tasks:
            if not stop_worker(worker, thread, 30000):
                log.warning("the %s thread did not stop in time", worker.what)
        self._tasks.clear()
        if not stop_worker(self._inference, self._inference_thread, 30000):
            log.warning("the inference thread did not stop in time")
