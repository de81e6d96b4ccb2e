"""The window's menus and keyboard shortcuts: File (sources, camera, capture, screenshot), Model, Device, View."""
from __future__ import annotations

from typing import TYPE_CHECKING

from PySide6.QtCore import QObject
from PySide6.QtGui import QAction, QActionGroup, QKeySequence
from PySide6.QtWidgets import QDialog, QDialogButtonBox, QFileDialog, QFormLayout, QLabel, QMessageBox, QVBoxLayout

from .sources import IMAGE_SUFFIXES, VIDEO_SUFFIXES, SourceSpec, list_cameras
from .state import ModelInfo

if TYPE_CHECKING:
    from .main_window import MainWindow

RUNTIMES = ("torch", "onnxruntime")  # engine.runtime.RUNTIMES (this module never imports the engine)
RESOLUTIONS = [None, (320, 240), (640, 480), (1280, 720), (1920, 1080)]
SHORTCUTS = [("Space", "pause / play"), ("Left / Right", "previous / next image or frame"), ("F11", "full screen"),
             ("F5", "presentation mode"), ("S", "screenshot to PNG"),
             ("C", "capture the frame on screen into the dataset folder"),
             ("R", "record: save every Nth frame into the dataset folder, until pressed again"),
             ("Ctrl+O", "open an image"),
             ("Ctrl+Shift+O", "open a folder"), ("Ctrl+B", "load a bundle"), ("Ctrl+I", "model info")]


class Actions(QObject):
    """The actions other parts of the window update (checked states, device list)."""

    def __init__(self, window: "MainWindow"):
        super().__init__(window)
        self.window = window
        session = window.session
        bar = window.menuBar()

        file = bar.addMenu("&File")
        self._add(file, "Open image…", window, self._on_open_image, "Ctrl+O")
        self._add(file, "Open folder (slideshow)…", window, self._on_open_folder, "Ctrl+Shift+O")
        self._add(file, "Open video…", window, self._on_open_video)
        self.camera_menu = file.addMenu("Camera")
        self.camera_menu.aboutToShow.connect(self._fill_cameras)
        resolution = file.addMenu("Camera resolution")
        group = QActionGroup(window)
        for res in RESOLUTIONS:
            act = QAction("camera default" if res is None else f"{res[0]} × {res[1]}", window, checkable=True)
            act.setData(res)
            act.setChecked(res is None)
            act.triggered.connect(self._on_resolution)
            group.addAction(act)
            resolution.addAction(act)
        self.mirror = QAction("Mirror image", window, checkable=True)
        self.mirror.toggled.connect(self._on_mirror)
        file.addAction(self.mirror)
        file.addSeparator()
        capture = window.capture_panel
        self._add(file, "Capture to folder…", window, window.show_capture_panel)
        self._add(file, "Capture frame", window, capture.capture, "C")
        self.record = self._add(file, "Record frames", window, capture.set_recording, "R", checkable=True)
        capture.recording_changed.connect(self.record.setChecked)
        file.addSeparator()
        self._add(file, "Save screenshot", window, self._on_screenshot, "S")
        file.addSeparator()
        self._add(file, "Quit", window, window.close, QKeySequence.StandardKey.Quit)

        model = bar.addMenu("&Model")
        self._add(model, "Built-in default model", window, self._on_default_bundle)
        self._add(model, "Load bundle…", window, self._on_load_bundle, "Ctrl+B")
        self._add(model, "Model info…", window, self._on_model_info, "Ctrl+I")
        self._add(model, "Reset counters", window, session.reset_counters)

        self.device_menu = bar.addMenu("&Device")
        self.device_menu.setToolTipsVisible(True)  # why a runtime cannot be chosen
        self.device_group = QActionGroup(window)
        self.runtime_group = QActionGroup(window)
        self.set_devices(None)

        view = self.view_menu = bar.addMenu("&View")  # MainWindow.add_panel adds its panels' toggles here
        self.presentation = self._add(view, "Presentation mode", window, window.set_presentation, "F5", checkable=True)
        self._add(view, "Full screen", window, window.toggle_full_screen, "F11")
        view.addSeparator()
        self._add(view, "Pause / play", window, session.toggle_pause, "Space")
        self._add(view, "Previous image", window, self._on_prev, "Left")
        self._add(view, "Next image", window, self._on_next, "Right")
        view.addSeparator()
        for dock in window.docks.values():
            view.addAction(dock.toggleViewAction())

        help_menu = bar.addMenu("&Help")
        self._add(help_menu, "Keyboard shortcuts", window, self._on_shortcuts)

    @staticmethod
    def _add(menu, text, window, slot, shortcut=None, checkable=False) -> QAction:
        act = QAction(text, window, checkable=checkable)
        if shortcut is not None:
            act.setShortcut(QKeySequence(shortcut))
        (act.toggled if checkable else act.triggered).connect(slot)
        menu.addAction(act)
        window.addAction(act)  # shortcuts work with the menu bar hidden (full screen)
        return act

    # -- sources -----------------------------------------------------------------------------------
    def _on_open_image(self) -> None:
        pattern = " ".join(f"*{s}" for s in IMAGE_SUFFIXES)
        path, _ = QFileDialog.getOpenFileName(self.window, "Open image", "", f"Images ({pattern});;All files (*)")
        if path:
            self.window.open_source(path)

    def _on_open_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self.window, "Open a folder of images (played as a slideshow)")
        if path:
            self.window.open_source(path)

    def _on_open_video(self) -> None:
        pattern = " ".join(f"*{s}" for s in VIDEO_SUFFIXES)
        path, _ = QFileDialog.getOpenFileName(self.window, "Open video", "", f"Videos ({pattern});;All files (*)")
        if path:
            self.window.open_source(path)

    def _fill_cameras(self) -> None:
        self.camera_menu.clear()
        cameras = list_cameras()
        if not cameras:
            act = self.camera_menu.addAction("no camera found")
            act.setEnabled(False)
        for index, name in cameras:
            act = self.camera_menu.addAction(f"{name} (camera {index})")
            act.setData(index)
            act.triggered.connect(self._on_camera)

    def _on_camera(self) -> None:
        index = self.sender().data()
        self.window.session.open_source(SourceSpec("camera", str(index)))

    def _on_resolution(self) -> None:
        self.window.session.resolution = self.sender().data()
        spec = self.window.session.spec
        if spec is not None and spec.kind == "camera":
            self.window.session.open_source(SourceSpec("camera", spec.target))

    def _on_mirror(self, on: bool) -> None:
        self.window.session.set_mirror(on)

    def _on_prev(self) -> None:
        self.window.session.step(-1)

    def _on_next(self) -> None:
        self.window.session.step(1)

    def _on_screenshot(self) -> None:
        self.window.save_screenshot()

    # -- model and device ------------------------------------------------------------------------------
    def _on_default_bundle(self) -> None:
        self.window.session.load_bundle(None)

    def _on_load_bundle(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self.window, "Load bundle", "", "Offramp bundles (*.offramp);;All files (*)")
        if path:
            self.window.load_bundle(path)

    def _on_model_info(self) -> None:
        info = self.window.session.info
        if info is None:
            self.window.show_error("no model is loaded: load a bundle with Model ▸ Load bundle…")
            return
        model_info_dialog(self.window, info).exec()

    def set_devices(self, info: ModelInfo | None) -> None:
        """Fill the Device menu with what the engine offers here (only "auto" before a model loads),
        then its Runtime section: what runs the model, a runtime that cannot run it here disabled
        with the reason as its tooltip."""
        self.device_menu.clear()
        for group in (self.device_group, self.runtime_group):
            for act in group.actions():
                group.removeAction(act)
        current = info.device if info is not None else self.window.session.device
        for name in ["auto", *(info.devices if info is not None else [])]:
            act = QAction(name, self.window, checkable=True)
            act.setChecked(name == current)
            act.triggered.connect(self._on_device)
            self.device_group.addAction(act)
            self.device_menu.addAction(act)
        self.device_menu.addSection("Runtime")
        runtime = info.runtime if info is not None else self.window.session.runtime
        reasons = info.runtimes if info is not None else {}
        for name in RUNTIMES:
            why = reasons.get(name, "") if info is not None else ""
            act = QAction(name, self.window, checkable=True)
            act.setChecked(name == runtime)
            act.setEnabled(not why)
            act.setToolTip(why or RUNTIME_TIPS[name])
            act.triggered.connect(self._on_runtime)
            self.runtime_group.addAction(act)
            self.device_menu.addAction(act)

    def check_device(self, device: str) -> None:
        for act in self.device_group.actions():
            act.setChecked(act.text() == device)

    def check_runtime(self, runtime: str) -> None:
        for act in self.runtime_group.actions():
            act.setChecked(act.text() == runtime)

    def _on_device(self) -> None:
        self.window.session.set_device(self.sender().text())

    def _on_runtime(self) -> None:
        self.window.session.set_runtime(self.sender().text())

    def _on_shortcuts(self) -> None:
        text = "\n".join(f"{k}\t{what}" for k, what in SHORTCUTS)
        QMessageBox.information(self.window, "Keyboard shortcuts", text)


RUNTIME_TIPS = {"torch": "PyTorch: TorchScript graphs, BatchNorm folded",
                "onnxruntime": "onnxruntime on the CPU: ONNX graphs made from the bundle when chosen (a few "
                               "seconds); the policy still decides on the host"}


def build_menus(window: "MainWindow") -> Actions:
    return Actions(window)


def model_info_dialog(parent, info: ModelInfo) -> QDialog:
    """A dialog listing the bundle's backbone, classes, exits, cost and policies."""
    dialog = QDialog(parent)
    dialog.setWindowTitle(f"Model — {info.name}")
    form = QFormLayout()
    for key, value in info.summary():
        label = QLabel(value)
        label.setWordWrap(True)
        label.setMinimumWidth(420)
        form.addRow(f"{key}:", label)
    buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
    buttons.rejected.connect(dialog.reject)
    layout = QVBoxLayout(dialog)
    layout.addLayout(form)
    layout.addWidget(buttons)
    return dialog
