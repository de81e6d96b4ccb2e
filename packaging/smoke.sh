#!/usr/bin/env bash
# Smoke test of the built app: a scripted run of the built-in model over a few generated images.
#
#   packaging/smoke.sh [--xvfb] [APP]     # APP: default packaging/dist/offramp/offramp-app
#
# Offscreen by default; --xvfb runs it on a virtual X server instead (xvfb-run), which also checks the
# xcb platform plugin a desktop uses. Leaves stats.json and shot.png in packaging/build/smoke/.
# Needs python3 (standard library only) to write the images and read the stats.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
xvfb=0
if [[ ${1:-} == --xvfb ]]; then xvfb=1; shift; fi
app=${1:-$here/dist/offramp/offramp-app}
frames=${FRAMES:-100}
out=${SMOKE_OUT:-$here/build/smoke}
[[ -x $app ]] || { echo "smoke.sh: no app at $app; build it first: packaging/build.sh" >&2; exit 2; }
rm -rf "$out" && mkdir -p "$out/images"

# eight 160x120 PNGs (colour gradients with a square), written with the standard library only
python3 - "$out/images" <<'PY'
import struct, sys, zlib
from pathlib import Path

def png(path, w, h, pixel):
    rows = b"".join(b"\0" + bytes(c for x in range(w) for c in pixel(x, y)) for y in range(h))
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))

for i in range(8):
    def pixel(x, y, i=i):
        inside = 40 + 8 * i <= x < 100 + 8 * i and 30 <= y < 90
        return (255 - 30 * i, 60, 30 * i) if inside else ((x * 2 + 31 * i) % 256, (y * 2) % 256, (97 * i) % 256)
    png(f"{sys.argv[1]}/image{i}.png", 160, 120, pixel)
PY

cmd=("$app" --source "$out/images" --frames "$frames" --stats "$out/stats.json" --screenshot "$out/shot.png"
     --timeout "${TIMEOUT:-120}")
if (( xvfb )); then
    cmd=(env QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1600x1000x24" "${cmd[@]}")
else
    cmd=(env QT_QPA_PLATFORM=offscreen "${cmd[@]}")
fi
start=$(date +%s.%N)
set +e
"${cmd[@]}" >"$out/app.log" 2>&1
rc=$?
set -e
wall=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$start" "$(date +%s.%N)")
if (( rc != 0 )); then
    echo "smoke.sh: FAILED: $app exited with $rc after $wall s; its output:" >&2
    tail -n 40 "$out/app.log" >&2
    exit 1
fi

python3 - "$out/stats.json" "$frames" "$wall" <<'PY'
import json, sys
stats, frames, wall = json.load(open(sys.argv[1])), int(sys.argv[2]), float(sys.argv[3])
if stats.get("frames", 0) < frames:
    sys.exit(f"smoke.sh: FAILED: stats.json reports {stats.get('frames')} frames, not {frames}")
fps = stats.get("fps") or 0.0
# the stats time the frames (first to last shown); the rest of the wall time is start-up (imports,
# window, model load) plus the short shutdown, so this is an upper bound on the time to the first frame
first = wall - (stats["frames"] - 1) / fps if fps else wall
print(f"smoke.sh: OK: {stats['frames']} frames of {stats['model']} on {stats['device']}, {fps:.1f} frames/s, "
      f"exits {stats['exit_histogram']}")
print(f"smoke.sh: wall time {wall:.2f} s; time to first frame <= {first:.2f} s")
PY
echo "smoke.sh: app folder $(du -sh "$(dirname "$app")" | cut -f1); screenshot $out/shot.png"
