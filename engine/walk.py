"""Walking folder trees of images: the one walker every folder reader uses (labelled and unlabelled
data, `offramp run` on a folder, the app's folder source and class counts).

Symbolic links are followed, so a class folder may live elsewhere, but never back into the tree's
own root or a folder above it, and never into a folder already walked: a link loop neither hangs
nor grows memory, and a link to its own folder adds nothing. Every real file is listed once
(deduplicated by (st_dev, st_ino), so hard links and links to files count once too). Hidden entries
(names starting with "." and __MACOSX) are left out. Only regular files are listed; broken links,
link loops, FIFOs, devices and unreadable folders are reported as problems, never opened.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

LOOP = "a link back into a folder above it (not followed)"
REPEAT = "a link to a folder already read (not followed)"
BROKEN_LINK = "broken link"
LINK_LOOP = "link loop"  # a link that leads, through other links, back to itself
NOT_REGULAR = "not a regular file"


def hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


class TreeWalker:
    """One walk over the tree under `root`. Its sub-folders (class folders) are walked with `files`,
    which shares what was seen: a folder or file reached twice, from any of them, counts once, under
    the first path walked. Walk real folders before links to them (`real_first`) so that a folder's
    own path wins. `problems` collects (path, reason) of what was left out and why."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)
        self.problems: list[tuple[str, str]] = []
        self._dirs: set[tuple[int, int]] = set()  # folders walked
        self._files: set[tuple[int, int]] = set()  # files listed
        self._above: set[tuple[int, int]] = set()  # the root and every folder above it: never entered by a link
        real = Path(os.path.realpath(self.root))
        for folder in (real, *real.parents):
            try:
                st = os.stat(folder)
            except OSError:
                continue
            self._above.add((st.st_dev, st.st_ino))

    def files(self, folder: str | os.PathLike | None = None) -> list[tuple[str, int]]:
        """(path, size in bytes) of every regular file under `folder` (default: the root), each real
        file once: a folder's files in name order, then its sub-folders in name order."""
        top = os.fspath(folder) if folder is not None else self.root
        found: list[tuple[str, int]] = []
        if folder is not None and not self._enter(top):
            return found
        if folder is None:  # the root itself: walked, never re-entered
            try:
                st = os.stat(top)
                self._dirs.add((st.st_dev, st.st_ino))
            except OSError as err:
                self.problems.append((top, f"unreadable folder ({err.strerror or err})"))
                return found
        stack = [top]
        while stack:
            subdirs = self._list(stack.pop(), found)
            entered = [d for d in real_first(subdirs) if self._enter(d)]
            stack.extend(reversed(sorted(entered, key=os.path.basename)))
        return found

    def _enter(self, folder: str) -> bool:
        """True when `folder` is to be walked now (and from now on counts as walked)."""
        try:
            st = os.stat(folder)
        except OSError as err:
            self.problems.append((folder, f"unreadable folder ({err.strerror or err})"))
            return False
        key = (st.st_dev, st.st_ino)
        if key in self._above:
            self.problems.append((folder, LOOP))
            return False
        if key in self._dirs:
            self.problems.append((folder, REPEAT))
            return False
        self._dirs.add(key)
        return True

    def _list(self, folder: str, found: list[tuple[str, int]]) -> list[str]:
        """Add `folder`'s own files to `found`; return its sub-folders, both in name order."""
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            self.problems.append((folder, f"unreadable folder ({err.strerror or err})"))
            return []
        subdirs = []
        for entry in entries:
            if hidden(entry.name):
                continue
            try:
                st = entry.stat()  # follows links
            except OSError as err:
                self.problems.append((entry.path, LINK_LOOP if err.errno == errno.ELOOP else BROKEN_LINK))
                continue
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(entry.path)
            elif not stat.S_ISREG(st.st_mode):
                self.problems.append((entry.path, NOT_REGULAR))
            elif (st.st_dev, st.st_ino) not in self._files:
                self._files.add((st.st_dev, st.st_ino))
                found.append((entry.path, st.st_size))
        return subdirs


def real_first(paths: list[str]) -> list[str]:
    """`paths` with real folders before links (each group in name order): the order to walk them
    in, so a folder reached both ways is read under its own name."""
    return sorted(paths, key=lambda p: (os.path.islink(p), os.path.basename(p)))


def walk_files(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """((path, size) of every regular file under `root`, each real file once; (path, reason) of
    what was left out): `TreeWalker(root).files()`."""
    walker = TreeWalker(root)
    return walker.files(), walker.problems
