"""Rewrite the README's benchmark table from benchmarks/results/*.json (the source of truth).

    .venv/bin/python docs/bench_table.py          # or: make bench-readme

Only the lines between the BENCHMARKS:START and BENCHMARKS:END markers change. A benchmark whose
results file is missing, or lacks a figure, shows "not recorded" instead of failing, so the
table can be refreshed after any one benchmark was re-run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "README.md"
START, END = "<!-- BENCHMARKS:START", "<!-- BENCHMARKS:END -->"
MISSING = "not recorded"


def _load(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _num(value: Any, unit: str = "", digits: int = 3) -> str:
    """A figure at `digits` significant digits, thousands separated: 1499.37 -> "1,499 s"."""
    if not isinstance(value, int | float):
        return MISSING
    number = float(f"{value:.{digits}g}")
    text = f"{number:,.0f}" if abs(number) >= 100 else f"{number:g}"
    return f"{text}{unit}"


def _ratio(ours: Any, other: Any) -> str:
    if not isinstance(ours, int | float) or not isinstance(other, int | float) or not ours:
        return ""
    return (
        f"; ours {_num(other / ours, 'x', 3)} faster"
        if other > ours
        else (f"; ours {_num(ours / other, 'x', 3)} slower")
    )


def _date(data: dict[str, Any], name: str) -> str:
    """The run's date from the results, else the results file's last commit date."""
    text = data.get("date") or data.get("started") or data.get("timestamp")
    if text:
        return str(text)[:10]
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return MISSING
    done = subprocess.run(
        ["git", "log", "-1", "--format=%cs", "--", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or MISSING


def data_rows() -> list[list[str]]:
    data = _load("bench_data")
    rows = []
    for scale, label in (("1x", "336,776 flights"), ("10x", "3,367,760 flights")):
        ours = _get(data, "summary", "by_scale", scale, "ours") or _get(
            data, "runs", f"{scale}/ours"
        )
        checks = _get(data, "summary", "by_scale", scale, "ours+checks") or _get(
            data, "runs", f"{scale}/ours+checks"
        )
        pandas = _get(data, "summary", "by_scale", scale, "pandas") or _get(
            data, "runs", f"{scale}/pandas"
        )
        floor = _get(data, "runs", f"{scale}/ours", "io_floor") or {}
        floor_text = (
            f"; I/O floor (tables written, no work) {_num(floor.get('total_s'), ' s')}"
            if floor.get("success") and floor.get("total_s")
            else ""
        )
        rows.append(
            [
                f"1 data, {scale} ({label})",
                "raw → cleaned → features, wall / peak RSS",
                f"{_num(_get(ours, 'wall_s'), ' s')} / {_num(_get(ours, 'peak_rss_mb'), ' MB')}; "
                f"with GX checks {_num(_get(checks, 'wall_s'), ' s')}",
                f"pandas {_num(_get(pandas, 'wall_s'), ' s')} / "
                f"{_num(_get(pandas, 'peak_rss_mb'), ' MB')}"
                + _ratio(_get(ours, "wall_s"), _get(pandas, "wall_s"))
                + floor_text,
                _date(data, "bench_data"),
                "`make bench-data`",
            ]
        )
    return rows


def training_rows() -> list[list[str]]:
    data = _load("bench_training")
    summary = _get(data, "summary", "1x") or {}
    dag, direct, skl = (summary.get(k) or {} for k in ("dagster", "direct", "sklearn"))
    overhead = _get(summary, "overhead", "model_step_vs_read_train")
    rows = (
        [
            [
                "2 training, 1x",
                "`model` step vs the same read + train without Dagster; test ROC AUC",
                f"{MISSING} yet",
                "LightGBM direct; pandas + scikit-learn",
                MISSING,
                "`make bench-training`",
            ]
        ]
        if not dag
        else [
            [
                "2 training, 1x",
                "`model` step vs the same read + train without Dagster; test ROC AUC",
                f"{_num(dag.get('model_step_s'), ' s')}, AUC {_num(dag.get('test_roc_auc'))}"
                + (f" (overhead {overhead:+.0%})" if isinstance(overhead, int | float) else ""),
                f"LightGBM direct {_num(direct.get('read_train_s'), ' s')}; pandas + scikit-learn "
                f"{_num(skl.get('wall_s'), ' s')}, AUC {_num(skl.get('test_roc_auc'))}",
                _date(data, "bench_training"),
                "`make bench-training`",
            ]
        ]
    )
    scale = _load("bench_scale")
    done = [k.split("/")[0] for k in (_get(scale, "runs") or {}) if k.endswith("/in_process")]
    largest = max(done, key=lambda k: int(k.rstrip("x")), default="1x")
    runs = _get(scale, "runs") or {}
    local, dask = runs.get(f"{largest}/in_process") or {}, runs.get(f"{largest}/dask") or {}
    rows_trained = (runs.get(f"{largest}/data") or {}).get("rows")
    label = f"{rows_trained / 1e6:.1f}M rows" if isinstance(rows_trained, int) else largest

    def cell(run: dict) -> str:
        return (f"{_num(run.get('wall_s'), ' s')} / {_num(run.get('peak_rss_mb'), ' MB')}, "
                f"AUC {_num(run.get('test_roc_auc'))}")

    rows.append(
        [
            f"2 training, scale-out ({label})",
            "training run (model → champion) wall / peak RSS, in process vs `lightgbm.dask`, "
            "2 workers, 100 rounds",
            f"Dask {cell(dask)}",
            f"in process {cell(local)}",
            _date(scale, "bench_scale"),
            "`make bench-scale`",
        ]
    )
    return rows


def serving_rows() -> list[list[str]]:
    data = _load("bench_serving")
    ours, bare = _get(data, "http", "ours") or {}, _get(data, "http", "bare") or {}
    return [
        [
            "3 serving, single row",
            "HTTP p50 / p99 latency, 1 connection",
            f"{_num(_get(ours, 'single_c1', 'p50_ms'), ' ms')} / "
            f"{_num(_get(ours, 'single_c1', 'p99_ms'), ' ms')}",
            f"bare BentoML + LightGBM {_num(_get(bare, 'single_c1', 'p50_ms'), ' ms')} / "
            f"{_num(_get(bare, 'single_c1', 'p99_ms'), ' ms')}",
            _date(data, "bench_serving"),
            "`make bench-serving`",
        ],
        [
            "3 serving, batches",
            "rows/s in 1000-row requests: JSON records, 1 connection; Arrow IPC, 1 worker / "
            "2 workers (4 connections)",
            f"{_num(_get(ours, 'batch1000_c1', 'rows_per_s'), ' rows/s')}; Arrow "
            f"{_num(_get(ours, 'batch1000_arrow_c1', 'rows_per_s'))} / "
            f"{_num(_get(data, 'http', 'ours_2w', 'batch1000_arrow_c4', 'rows_per_s'), ' rows/s')}",
            f"bare BentoML {_num(_get(bare, 'batch1000_c1', 'rows_per_s'), ' rows/s')}; "
            f"model alone {_num(_get(data, 'in_process_model', 'bulk_rows_per_s'), ' rows/s')}",
            _date(data, "bench_serving"),
            "`make bench-serving`",
        ],
        *_log_cost_rows(data),
    ]


def _log_cost_rows(data: dict) -> list[list[str]]:
    """The inference log's cost, log on and off served side by side (alternating rounds)."""
    scenarios = [s for w in (data.get("logging_cost_ab") or {}).values() for s in w.values()]
    if not scenarios:
        return []
    throughput = [s["cost_pct"] for s in scenarios]
    share = [s["log_threads_share_pct"] for s in scenarios]
    return [
        [
            "3 serving, inference log",
            "cost with the log on: throughput lost (median of alternating rounds), and the "
            "log's own threads as a share of the server's CPU; single rows and 1000-row Arrow "
            "batches, 1 and 2 workers",
            f"{min(throughput):.1f} to {max(throughput):.1f}% of throughput; "
            f"log threads {min(share):.1f}-{max(share):.1f}% of CPU",
            "the same service with the log off (ML_LIFECYCLE_INFERENCE_LOG=0), served at the "
            "same time",
            _date(data, "bench_serving"),
            "`make bench-serving`",
        ]
    ]


def drift_rows() -> list[list[str]]:
    data = _load("bench_drift")
    results = data.get("results") or {}
    ours, scipy, evidently = (results.get(k) or {} for k in ("ours", "scipy", "evidently"))
    rows = _get(data, "rows", "current")
    return [
        [
            "4 drift",
            f"{_num(rows)} current vs reference rows, 25 columns: time / peak RSS",
            f"{_num(ours.get('median_s'), ' s')} / {_num(ours.get('peak_mb'), ' MB')}",
            f"Evidently {_num(evidently.get('median_s'), ' s')} / "
            f"{_num(evidently.get('peak_mb'), ' MB')}"
            + _ratio(ours.get("median_s"), evidently.get("median_s"))
            + f"; numpy/scipy {_num(scipy.get('median_s'), ' s')}",
            _date(data, "bench_drift"),
            "`make bench-drift`",
        ]
    ]


def table() -> str:
    header = ["stage", "what is measured", "ml-lifecycle", "compared with", "run on", "reproduce"]
    rows = data_rows() + training_rows() + serving_rows() + drift_rows()
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    text = README.read_text()
    if START not in text or END not in text:
        print(f"{README}: markers {START} ... {END} not found", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    marker_line, _, _ = rest.partition("\n")
    _, tail = rest.split(END, 1)
    new = f"{head}{START}{marker_line}\n{table()}\n{END}{tail}"
    if new != text:
        README.write_text(new)
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
