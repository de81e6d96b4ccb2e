"""`offramp-app` / `python -m app`: the desktop window, or a scripted run with --frames.

    offramp-app [PATH]                       # PATH: a bundle to load or a source to open
    offramp-app --source PATH --frames N --screenshot OUT.png --stats OUT.json
                [--bundle B] [--device D] [--runtime torch|onnxruntime] [--presentation]
    offramp-app --log-level INFO --log-file offramp.log   # what the workers did, tracebacks included
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

PROG = "offramp-app"
MAX_TIMEOUT_S = (2**31 - 1) // 1000  # QTimer takes a 32-bit count of milliseconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description="Watch a multi-exit classifier take its off-ramps, live.")
    p.add_argument("path", nargs="?", help="a bundle (.offramp) to load or an image, folder or video to open")
    p.add_argument("--source", help="image, folder, video or camera:N to open")
    p.add_argument("--bundle", help="bundle to load (default: the last one used, else the built-in default)")
    p.add_argument("--device", help="device to run on (auto, cpu, cuda, cuda:1, mps)")
    p.add_argument("--runtime", choices=["torch", "onnxruntime"],
                   help="what runs the model: torch (default) or onnxruntime (CPU only; Device ▸ Runtime in the window)")
    p.add_argument("--presentation", action="store_true", help="start in presentation mode")
    p.add_argument("--frames", type=int, help="scripted run: quit after this many frames were shown")
    p.add_argument("--screenshot", help="scripted run: save a PNG of the window here at the end")
    p.add_argument("--stats", help="scripted run: save a JSON of what was shown here at the end")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: one frame at a time gains nothing from more, and the "
                        "window and capture need the other cores); 0 = torch's default")
    p.add_argument("--timeout", type=float, default=120.0, help="scripted run: give up after this many seconds")
    p.add_argument("--fps", type=float, help="scripted run: read files at this many frames/s, as a camera "
                   "would deliver them (default: as fast as inference takes them)")
    from engine.logs import LEVELS  # no torch
    p.add_argument("--log-level", type=str.upper, choices=LEVELS, default="WARNING",
                   help="log records of this level and above go to stderr (and --log-file); default WARNING")
    p.add_argument("--log-file", metavar="PATH", help="also append the log to this file, with times and threads")
    return p.parse_args(argv)


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def max_threads() -> int:
    """The most torch threads --threads takes: beyond a few per core they only wait for each other, and
    a huge count makes OpenMP try to start that many threads, which can take the process down."""
    return 4 * (os.cpu_count() or 1)


def _check_output(args: argparse.Namespace, option: str) -> str | None:
    """A one-line complaint about where `option` (--screenshot, --stats) would write, or None; said
    before the run, which can take minutes, by the rule the CLI's outputs follow (`check_output_path`:
    no folder, FIFO, device or broken link, and the folder must exist). A usable path is stored back
    with `~` expanded, as it will be written."""
    from engine.files import OutputPathError, check_output_path
    dest = option.lstrip("-")
    text = getattr(args, dest)
    if text is None:
        return None
    try:
        path = check_output_path(text, what=f"{dest} file", option=option)
    except OutputPathError as e:
        return str(e)
    setattr(args, dest, str(path))
    return None


def _check(args: argparse.Namespace) -> str | None:
    """A one-line complaint about the arguments, or None when they are usable."""
    from .sources import SourceError, SourceSpec
    scripted = args.frames is not None or args.screenshot or args.stats
    if scripted and not (args.source or args.path):
        return "--frames, --screenshot and --stats need --source PATH"
    if args.frames is not None and args.frames < 1:
        return f"--frames must be at least 1, not {args.frames}"
    if args.fps is not None and not (0 < args.fps <= 10000):  # also refuses nan
        return f"--fps must be a number of frames per second above 0 (at most 10000), not {args.fps:g}"
    if args.fps is not None and not scripted:
        return "--fps paces a scripted run (--frames, --screenshot or --stats)"
    if not (0 < args.timeout <= MAX_TIMEOUT_S):  # also refuses nan; Qt's timers count ms in 32 bits
        return f"--timeout must be a number of seconds above 0 (at most {MAX_TIMEOUT_S}), not {args.timeout:.15g}"
    if not (0 <= args.threads <= max_threads()):
        return f"--threads must be 0 (torch's default) or 1 to {max_threads()}, not {args.threads}"
    for option in ("--screenshot", "--stats"):
        problem = _check_output(args, option)
        if problem:
            return problem
    source = args.source or (args.path if scripted else None)
    if source:
        try:
            SourceSpec.from_text(source)
        except SourceError as e:
            return str(e)
    if args.bundle and not Path(args.bundle).is_file():
        return f"bundle {args.bundle} does not exist"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problem = _check(args)
    if problem:
        return _fail(problem)
    from engine.logs import setup_logging
    try:
        setup_logging(args.log_level, args.log_file)
    except OSError as e:
        return _fail(f"cannot write the log file {args.log_file}: {e.strerror or e}")
    from .qt_binding import binding_problem
    problem = binding_problem()  # a known-bad Qt binding crashes minutes later: refuse it now, in one line
    if problem:
        return _fail(problem)
    from .platform_check import xcb_problem
    problem = xcb_problem()  # Qt would abort in QApplication with a generic message: name the packages instead
    if problem:
        return _fail(problem)
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from .main_window import MainWindow
    from .session import Session

    # the inference thread runs Python between its tensor ops; handing the GIL over every 1 ms instead
    # of 5 ms keeps the GUI thread from waiting behind it
    sys.setswitchinterval(0.001)
    app = QApplication.instance() or QApplication([sys.argv[0]])
    app.setOrganizationName("Offramp")
    app.setApplicationName(PROG)
    app.setDesktopFileName("offramp")  # matches packaging/offramp.desktop, so docks show its icon
    from PySide6.QtGui import QIcon
    from engine.resources import resource_path  # no torch: the window opens before the engine loads
    icon = resource_path("offramp.png")
    if icon.is_file():
        app.setWindowIcon(QIcon(str(icon)))
    scripted = args.frames is not None or bool(args.screenshot or args.stats)
    session = Session(device=args.device or "auto", threads=args.threads or None)
    try:  # whatever happens, the worker threads are stopped and waited for before Python exits
        window = MainWindow(session, settings=None if scripted else QSettings(), presentation=False)
        if args.device:
            session.device = args.device  # the command line wins over the remembered device
        if args.runtime:
            session.runtime = args.runtime
        if args.presentation:
            window.set_presentation(True)
        else:
            window.show()
        if scripted:
            return _run_scripted(app, window, args)
        sys.excepthook = lambda kind, value, tb: _show_unexpected(window, kind, value, tb)
        path = args.source or args.path
        bundle = args.bundle or (path if path and path.lower().endswith(".offramp") else None)
        window.startup(bundle=bundle, source=path if path and path != bundle else None)
        return app.exec()
    finally:
        session.shutdown()


def _run_scripted(app, window, args) -> int:
    from .scripted import ScriptedRun
    app.setQuitOnLastWindowClosed(False)  # the run ends with app.exit(code), not by closing the window
    outcome = {"code": 3, "message": "the window closed before the run ended"}

    def on_done(code: int, message: str) -> None:
        outcome.update(code=code, message=message)
        window.close()
        app.exit(code)

    from .remember import remembered_bundle, user_settings
    bundle = args.bundle or remembered_bundle(user_settings())  # as --help says, like the window's start
    run = ScriptedRun(window, source=args.source or args.path, frames=args.frames or 1, screenshot=args.screenshot,
                      stats=args.stats, bundle=bundle, timeout_s=args.timeout, fps=args.fps)
    run.done.connect(on_done)
    run.start()
    app.exec()
    if outcome["code"]:
        return _fail(outcome["message"])
    return 0


def _show_unexpected(window, kind, value, tb) -> None:
    """A bug must not take the window down: the traceback to the log, one line in the window."""
    logging.getLogger("app").error("unexpected error", exc_info=(kind, value, tb))
    window.show_error(f"unexpected error ({kind.__name__}): {value}")


if __name__ == "__main__":
    sys.exit(main())
