"""A live progress line while a benchmark child runs: what runs, for how long, at what RSS.

Benchmarks run each measurement in a child process and wait; this shows the wait (tqdm on
stderr, refreshed twice a second) so a long run is visibly alive. It never touches the timing:
the child measures itself.
"""

from __future__ import annotations

import time

from tqdm import tqdm


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
