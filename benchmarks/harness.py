"""What the benchmark scripts share: running one measured child and watching it.

Each benchmark runs every measurement in a fresh child process (the script itself with
`--child ...`), so imports and earlier runs cannot blur the figures. `run_child` starts it in its
own session, samples its process tree's RSS every 50 ms (the peak is the reported memory), shows
a live line (what runs, elapsed, RSS; tqdm on stderr, never part of the timing), enforces the
timeout and reads the JSON the child wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

SAMPLE_SECONDS = 0.05
REPO = Path(__file__).resolve().parents[1]


class ChildBar:
    def __init__(self, argv: list[str]) -> None:
        words = [a for a in argv if not a.startswith("-") and "/" not in a]
        self.bar = tqdm(desc="  " + (" ".join(words) or "child"), total=None, leave=False,
                        bar_format="{desc}: {elapsed} elapsed{postfix}", mininterval=0.5)
        self.last = 0.0

    def tick(self, rss_bytes: int) -> None:
        now = time.monotonic()
        if now - self.last >= 0.5:
            self.last = now
            self.bar.set_postfix_str(f"RSS {rss_bytes / 2**20:,.0f} MB", refresh=True)

    def close(self) -> None:
        self.bar.close()


def run_child(script: Path, argv: list[str], log: Path, out: Path, timeout: float) -> dict:
    """Run `script argv --out out` (output to `log`); returns the child's JSON plus
    `process_s`, `peak_rss_mb` and the 1-min load before/after (or `error` when it failed)."""
    import psutil

    out.unlink(missing_ok=True)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    peak = 0
    timed_out = False
    with log.open("w") as handle:
        proc = subprocess.Popen(
            [sys.executable, str(script), *argv, "--out", str(out)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
        parent = psutil.Process(proc.pid)
        bar = ChildBar(argv)
        try:
            while proc.poll() is None:
                with contextlib.suppress(psutil.Error):
                    rss = 0
                    for p in [parent, *parent.children(recursive=True)]:
                        with contextlib.suppress(psutil.Error):
                            rss += p.memory_info().rss
                    peak = max(peak, rss)
                if time.perf_counter() - started > timeout:
                    timed_out = True
                    break
                bar.tick(peak)
                time.sleep(SAMPLE_SECONDS)
        finally:  # timeout, Ctrl-C or SIGTERM: end the child's own session (only what we started)
            bar.close()
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                proc.wait()
    process_s = time.perf_counter() - started
    result: dict = {"success": False}
    if out.exists():
        result = json.loads(out.read_text())
    elif timed_out:
        result["error"] = f"timed out after {timeout:.0f} s"
    else:
        tail = log.read_text().splitlines()[-15:]
        result["error"] = f"exit code {proc.returncode}; log {log}:\n" + "\n".join(tail)
    result["process_s"] = process_s
    result["peak_rss_mb"] = peak / 2**20
    result["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def prepare_landing(workdir: Path, scale: int, spec_path: Path, say) -> Path:
    """Landing files for `scale` in workdir/landing_<scale>/ (written once; not timed)."""
    sys.path.insert(0, str(REPO))
    from ml_lifecycle.data.landing import land
    from ml_lifecycle.spec import load_spec

    landing = workdir / f"landing_{scale}"
    started = time.perf_counter()
    written = land(load_spec(spec_path), scale=scale, landing=landing)
    say(
        f"landing files for {scale}x: {len(written)} written, "
        f"{sum(1 for _ in landing.rglob('*.*'))} present ({time.perf_counter() - started:.1f} s,"
        " not timed)"
    )
    return landing


def link_landing(landing: Path, target: Path) -> None:
    """`target` becomes a copy of the landing folder, hard-linked when the filesystem allows."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(landing, target, copy_function=os.link)
    except OSError:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(landing, target)
