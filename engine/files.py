"""Writing files so that a reader never sees half of one and an interruption loses nothing.

Every write goes to a temporary file in the destination folder, `.NAME.offramp-tmp-PID-XXXXXXXX`,
and is then renamed over NAME (atomic within one file system). A process killed mid-write leaves
its temporary behind: the next write into that folder removes the temporaries of ours whose
process is gone or that are older than STALE_AFTER_S. Commands check where they will write before
any work starts (`check_output_path`), and a result that still cannot be written is kept in a
spare folder (`save_or_keep`) rather than thrown away. JSON is always written strictly
(`json_text`: non-finite numbers become null, never a bare NaN).

Only a regular file is replaced by a file, and only an empty folder or one its writer recognises
as its own by a folder (`target_problem`): a FIFO, a device, a folder of the user's files is never
written over. A write through a symbolic link replaces the file (or folder) the link names, and the
link stays, as the shell's `>` and cp do: a link is how a user says where the file lives.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

log = logging.getLogger(__name__)

TEMP_MARK = ".offramp-tmp-"
STALE_AFTER_S = 6 * 3600  # a temporary this old is stale even if its process id is alive (ids get reused)
_TEMP_NAME = re.compile(r"^\..+\.offramp-tmp-(\d+)-[0-9a-f]+$")
_OLD_BUNDLE_TEMP = re.compile(r"^\..+\.offramp\.(\d+)\.[0-9a-f]{8}\.tmp$")  # save_bundle's temporaries before
_SAFETENSORS_TEMP = re.compile(r"^\.tmp[0-9A-Za-z]{6}$")  # safetensors' save_file wrote through these before
_SAFETENSORS_STALE_S = 600
RESCUE_ENV = "OFFRAMP_RESCUE_DIR"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- temporaries ----------------------------------------------------------------------------------
def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name next to `path`, recognisably ours and naming this process."""
    path = Path(path)
    return path.parent / f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another save of this process may be writing it right now
    if os.name != "posix":
        return True  # no cheap, harmless probe: only age makes such a temporary stale
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike, *, max_age_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove our temporaries in `folder` whose writing process is gone or that are older than
    `max_age_s`; returns what was removed. Never raises: cleaning up must not stop a save."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        try:
            if not _is_stale(entry, max_age_s):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            log.debug("could not remove the stale temporary %s", entry.path, exc_info=True)
    return removed


def _is_stale(entry: os.DirEntry, max_age_s: float) -> bool:
    match = _TEMP_NAME.match(entry.name) or _OLD_BUNDLE_TEMP.match(entry.name)
    if match is None and _SAFETENSORS_TEMP.match(entry.name) is None:
        return False  # not ours
    age = time.time() - entry.stat(follow_symlinks=False).st_mtime
    if match is None:  # no process id in the name: only a bundle's, and only when not written to lately
        return age >= _SAFETENSORS_STALE_S and entry.is_file(follow_symlinks=False) and _is_bundle(entry.path)
    return age >= max_age_s or not _pid_alive(int(match.group(1)))


def _is_bundle(path: str) -> bool:
    """Whether the file starts like an Offramp bundle (a safetensors header holding our manifest)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return b"offramp-bundle" in f.read(min(n, 1 << 20))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- what a write may replace ----------------------------------------------------------------------
class NotReplaceable(OSError):
    """What is at a path being written is not something to replace (a FIFO, a device, a folder of
    someone's files). An OSError, as a failed write is, so that `save_or_keep` keeps the result."""


def target_problem(path: str | os.PathLike, *, folder: bool = False) -> str | None:
    """Why what is at `path` must not be replaced by a new file (with `folder`: by a new folder), as
    the end of a sentence that starts with the path ("is a folder"); None when nothing is there or
    it may be replaced. Links are followed (see the module's docstring), so a link to a regular file
    is fine, and a link that leads nowhere is refused: where it was meant to lead is unknown."""
    path = Path(path)
    if os.path.islink(path) and not path.exists():
        return "is a broken link or a link loop"
    if folder:
        return "is a file, not a folder" if path.exists() and not path.is_dir() else None
    if path.is_dir():
        return "is a folder"
    if path.exists() and not path.is_file():
        return "exists and is not a regular file (a FIFO, a device or a socket)"
    return None


def followed(path: Path) -> Path:
    """`path`, or the path a symbolic link at `path` leads to: where a write really goes."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _swap_folder(tmp: Path, path: Path, check_old: Callable[[Path], None] | None) -> None:
    """Put the finished folder `tmp` in the place of `path`. An existing `path` is moved aside first
    and removed only once `tmp` is in its place (a folder cannot be renamed over a full one): if the
    rename fails, the old folder goes back. Only an empty folder, or one `check_old` accepts (it
    raises when the folder is not its writer's own), is replaced: never a folder of other files."""
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    if any(path.iterdir()):
        if check_old is None:
            raise NotReplaceable(f"{path} is a folder that is not empty; choose a new folder or remove it yourself")
        check_old(path)
    aside = temp_path(path)  # recognisably ours: a kill between the two renames leaves it for clean_stale_temps
    os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def replacing(path: str | os.PathLike, *, folder: bool = False,
              check_old: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path` to write (a file, or with `folder` a folder that is
    created); when the block ends, the temporary is flushed to disk and renamed over `path`.
    If anything fails, the temporary is removed and a previous `path` is left untouched.
    The result gets the usual permissions (0666 / 0777 less the umask), not a temporary's.

    Only a regular file is replaced by a file; with `folder`, only an empty folder or one that
    `check_old(path)` accepts (it raises, in one sentence, when the folder is not one to replace).
    Through a symbolic link, the file or folder the link names is replaced and the link stays.
    Raises NotReplaceable, naming `path`, for anything else (before and again after the block:
    what is there may change while the block writes)."""
    path = Path(path)
    problem = target_problem(path, folder=folder)
    if problem:
        raise NotReplaceable(f"{path} {problem}, so it was not replaced; choose another path")
    path = followed(path)
    clean_stale_temps(path.parent)
    tmp = temp_path(path)
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        problem = target_problem(path, folder=folder)
        if problem:
            raise NotReplaceable(f"{path} {problem}, so it was not replaced; choose another path")
        umask = current_umask()
        if folder:
            os.chmod(tmp, 0o777 & ~umask)
            for f in tmp.iterdir():
                os.chmod(f, 0o666 & ~umask)
            _swap_folder(tmp, path, check_old)
        else:
            _fsync(tmp)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary next to it (`replacing`): a previous file stays
    intact if anything fails. Creates missing parent folders. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return path


# -- JSON -----------------------------------------------------------------------------------------
def finite(obj):
    """`obj` with every non-finite float (NaN, ±inf) replaced by None, in nested dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_text(obj, *, indent: int | None = None) -> str:
    """Strict JSON for `obj` (non-finite numbers become null; never a bare NaN or Infinity).
    Raises TypeError for values JSON cannot hold."""
    return json.dumps(finite(obj), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj, *, indent: int | None = 1) -> Path:
    """`json_text(obj)` written atomically to `path`; returns the path."""
    return write_atomic(path, json_text(obj, indent=indent).encode("utf-8"))


# -- where results go -----------------------------------------------------------------------------
class OutputPathError(ValueError):
    """A path to write cannot be written: said before any work starts."""


def check_output_path(path: str | os.PathLike, *, suffixes: Sequence[str] = (), what: str = "file",
                      option: str = "--out", folder: bool = False) -> Path:
    """Check that `path` can be written before any work starts: nothing is there that `replacing`
    would refuse (`target_problem`: a folder, or with `folder` a file; a FIFO, a device, a broken
    link), its parent folder exists and takes new files, and it ends in one of `suffixes`
    (case-insensitive; none = any). Returns the path; raises OutputPathError, one sentence naming
    the path and what to do."""
    text = os.fspath(path)
    if not text.strip():
        raise OutputPathError(f"{option} is empty; give the {what} to write")
    path = Path(text).expanduser()
    problem = target_problem(path, folder=folder)  # the same rule `replacing` keeps when it writes
    if problem:
        if folder:
            hint = f"give {option} a new folder name for the {what}"
        elif path.is_dir():
            example = path / f"model{suffixes[0]}" if suffixes else path / "NAME"
            hint = f"give {option} a file name for the {what}, e.g. {example}"
        else:
            hint = f"choose another {option}"
        raise OutputPathError(f"{path} {problem}; {hint}")
    if not folder and suffixes and path.suffix.lower() not in [s.lower() for s in suffixes]:
        raise OutputPathError(f"{path} does not end in {' or '.join(suffixes)}; name the {what} "
                              f"{path.with_suffix(suffixes[0]).name} (or choose another {option})")
    real = followed(path)  # through a link, the write lands next to what it names
    parent = real.parent
    if not parent.exists():
        raise OutputPathError(f"the folder {parent} for {path} does not exist; create it or choose another {option}")
    if not parent.is_dir():
        raise OutputPathError(f"{parent} is not a folder, so {path} cannot be written; choose another {option}")
    probe = temp_path(real)
    try:  # os.access says nothing of read-only file systems, ACLs or quotas: try it
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"the folder {parent} cannot take new files ({e.strerror or e}), so {path} "
                              f"cannot be written; choose another {option}") from None
    return path


class SaveFailed(RuntimeError):
    """A finished result could not be written where asked. `kept_at` is where a copy was written
    instead, or None when no copy could be written either."""

    def __init__(self, message: str, kept_at: Path | None = None):
        super().__init__(message)
        self.kept_at = kept_at


def rescue_folders() -> list[Path]:
    """Where `save_or_keep` keeps a result it could not write: $OFFRAMP_RESCUE_DIR if set, else the
    user's cache folder, the temporary folder, then the working folder."""
    env = os.environ.get(RESCUE_ENV)
    if env:
        return [Path(env).expanduser()]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [cache / "offramp" / "unsaved", Path(tempfile.gettempdir()) / "offramp-unsaved", Path.cwd()]


def save_or_keep(write: Callable[[Path], object], path: str | os.PathLike, *, what: str = "result") -> Path:
    """`write(path)`; when that fails with an OSError (disk full, permissions changed), `write` a
    copy into the first of `rescue_folders()` that takes it and raise SaveFailed saying where it is
    (or that nothing could be kept). Returns `path` when it was written."""
    path = Path(path)
    try:
        write(path)
        return path
    except OSError as e:
        log.debug("writing %s failed", path, exc_info=True)
        cause = e.__cause__ if isinstance(e.__cause__, OSError) else e  # save_bundle's one sentence wraps it
        reason = cause.strerror or str(cause)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    tried = []
    for folder in rescue_folders():
        spare = folder / f"{path.stem}-unsaved-{stamp}-{os.getpid()}{path.suffix}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write(spare)
        except OSError:
            log.debug("keeping a copy in %s failed", folder, exc_info=True)
            tried.append(str(folder))
            continue
        raise SaveFailed(f"could not write {path} ({reason}); the {what} was kept at {spare}: move it from there",
                         spare)
    raise SaveFailed(f"could not write {path} ({reason}), nor keep a copy in {', '.join(tried)}; the {what} is lost")
