"""The promotion gate: may a challenger replace the champion?

It must meet every threshold in the spec's `thresholds.promotion` (a floor for metrics where
higher is better, a ceiling otherwise) on the test split, and must not be worse than the
champion on the task's primary metric, measured on the same test rows, by more than
`thresholds.champion_tolerance`. The first model becomes champion if it meets the thresholds.
"""

from __future__ import annotations

import math
from typing import Any

from ml_lifecycle.spec import Thresholds
from ml_lifecycle.training.metrics import HIGHER_IS_BETTER, PRIMARY, is_better


def promotion_decision(
    task: str,
    thresholds: Thresholds,
    challenger_version: str,
    challenger_test: dict[str, float],
    champion_version: str | None,
    champion_test: dict[str, float] | None,
) -> dict[str, Any]:
    checks: list[dict[str, Any]] = []
    for metric, bound in thresholds.promotion.items():
        value = challenger_test.get(metric, math.nan)
        higher = HIGHER_IS_BETTER.get(metric, True)
        ok = (value >= bound) if higher else (value <= bound)
        ok = bool(ok) and not math.isnan(value)
        checks.append({"check": f"{metric} {'>=' if higher else '<='} {bound}",
                       "value": value, "passed": ok})
    primary = PRIMARY[task]
    if champion_version and champion_version != challenger_version and champion_test:
        tolerance = thresholds.champion_tolerance
        ok = is_better(primary, challenger_test.get(primary, math.nan),
                       champion_test.get(primary, math.nan), tolerance)
        checks.append({
            "check": f"{primary} not worse than champion {champion_version} "
                     f"(tolerance {tolerance})",
            "value": challenger_test.get(primary), "champion": champion_test.get(primary),
            "passed": bool(ok)})
    passed = all(c["passed"] for c in checks)
    failed = [c for c in checks if not c["passed"]]
    if champion_version == challenger_version:
        reason = f"{challenger_version} is already the champion"
    elif passed:
        reason = (f"{challenger_version} meets {len(checks)} check(s)" +
                  (f" and is not worse than {champion_version}" if champion_version else
                   " and becomes the first champion"))
    else:
        reason = "; ".join(
            f"{c['check']}: found {c['value']:.4f}" + (f" vs {c['champion']:.4f}"
                                                       if "champion" in c else "")
            if isinstance(c.get("value"), float) else c["check"] for c in failed)
    return {
        "decision": "promote" if passed else "refuse",
        "challenger": challenger_version,
        "champion": champion_version,
        "primary_metric": primary,
        "checks": checks,
        "reason": reason,
    }
