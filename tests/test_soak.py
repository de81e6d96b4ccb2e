"""The soak run: a demo runs for an hour, so CI plays thousands of frames through the real app.

`offramp-app --source FOLDER --frames 5000 --stats …` in its own process (an abort — PySide6 6.12.0 on
Python 3.11 died with rc 134 after about 35 s of video — shows as its exit code, not as a dead test
run), on the built-in model, with the window painted offscreen as it would be on screen. It must end
normally, write its stats, and hold its resident memory: at the end within 10 % of what it was at
frame 500 (after the warm-up of caches and allocators)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from synth import make_image_folder

FRAMES = 5000
GROWTH = 0.10


def test_soak_thousands_of_frames_without_abort_or_growth(tmp_path):
    folder = make_image_folder(tmp_path / "images", ["red", "green", "blue"], per_class=10, size=32, seed=3)
    stats, shot = tmp_path / "soak.json", tmp_path / "soak.png"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run([sys.executable, "-m", "app", "--source", str(folder), "--frames", str(FRAMES),
                           "--stats", str(stats), "--screenshot", str(shot), "--device", "cpu", "--timeout", "900"],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-3000:]}"
    data = json.loads(stats.read_text())
    assert data["frames"] >= FRAMES and sum(data["exit_histogram"]) == data["frames"]
    assert shot.stat().st_size > 5000
    at, end = data["rss_mb_at"], data["rss_mb_end"]
    if sys.platform.startswith("linux"):
        assert at and end, data
        assert end <= at * (1 + GROWTH), f"resident memory grew from {at} MiB at frame 500 to {end} MiB"
    print(f"soak: {data['frames']} frames in {data['wall_s']} s, {data['fps']:.0f} frames/s, "
          f"resident {at} MiB at frame {data['rss_mb_at_frame']} -> {end} MiB at the end")
