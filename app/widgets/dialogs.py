"""Asking where to save: one helper for every "Save …" button, so that no path replaces a file
the user was not asked about."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QFileDialog, QMessageBox, QWidget

BUNDLE_SUFFIX = ".offramp"
BUNDLE_FILTER = "Offramp bundles (*.offramp)"


def ask_save_path(parent: QWidget, title: str, proposal: str, suffix: str = BUNDLE_SUFFIX,
                  name_filter: str = BUNDLE_FILTER) -> str | None:
    """The path the user chose in a save dialog (proposing `proposal`), ending in `suffix`; None
    when they cancelled, or declined to replace an existing file.

    The dialog asks before replacing the name as typed ("keep"); the suffix is added after it
    closed, so the file that will be written ("keep.offramp") may exist without the user having
    been asked: then they are asked here."""
    path, _ = QFileDialog.getSaveFileName(parent, title, proposal, name_filter)
    if not path:
        return None
    if path.lower().endswith(suffix):
        return path  # the name the dialog checked is the one written
    path += suffix
    if Path(path).exists():
        answer = QMessageBox.question(
            parent, title, f"{Path(path).name} already exists in {Path(path).parent}. Replace it?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, QMessageBox.StandardButton.No)
        if answer != QMessageBox.StandardButton.Yes:
            return None
    return path
