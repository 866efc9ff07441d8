"""The evaluation report: its plots (PNG bytes), `evaluation.json`, `evaluation.html` and the
markdown the Dagster UI shows.

Figures are built on matplotlib's object API with the Agg canvas, never through pyplot's global
state, so plotting is safe in any process or thread Dagster runs the asset in.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from ml_lifecycle.training.metrics import (
    METRICS,
    PRIMARY,
    calibration_curve,
    pr_curve,
    roc_curve,
)

DPI = 90
MAX_POINTS = 20_000  # points drawn in a scatter or hexbin
MAX_CURVE_POINTS = 2_000  # vertices of a ROC / PR line
TOP_FEATURES = 25
PLOT_TITLES = {
    "roc": "ROC curve",
    "pr": "Precision-recall curve",
    "calibration": "Calibration",
    "residuals": "Residuals",
    "predicted_vs_actual": "Predicted vs actual",
    "confusion": "Confusion matrix",
    "importance": "Feature importance",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MODEL_COLOR = "#1f77b4"
_BASELINE_COLOR = "#7f7f7f"


# -- figures --------------------------------------------------------------------------------


def _figure(width: float = 6.0, height: float = 4.5) -> Figure:
    # matplotlib is imported on first use: importing it costs seconds in every run process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def plot_png(fig: Figure) -> bytes:
    """Render a figure to PNG bytes (Agg, 90 dpi, tight bounding box) and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    if getattr(fig.canvas, "manager", None) is not None:  # made by pyplot: release it there
        from matplotlib import pyplot

        pyplot.close(fig)
    fig.clear()
    return buffer.getvalue()


def png_markdown(png: bytes, alt: str) -> str:
    """A markdown image that carries the PNG inline as a base64 data URI."""
    alt_text = alt.replace("[", "(").replace("]", ")")
    return f"![{alt_text}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def _subsample(n: int, limit: int = MAX_POINTS) -> np.ndarray:
    """Row indices to draw: all rows up to `limit`, else a fixed random sample (stable plots)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, size=limit, replace=False))


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most MAX_CURVE_POINTS vertices of a curve, always keeping both ends."""
    if len(x) <= MAX_CURVE_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, MAX_CURVE_POINTS).round().astype(int))
    return x[keep], y[keep]


def _roc_plot(y: np.ndarray, p: np.ndarray, baseline: np.ndarray | None, split: str) -> Figure:
    figure = _figure(5.5, 5.0)
    ax = figure.add_subplot()
    series = [("model", p, _MODEL_COLOR, "-")]
    if baseline is not None:
        series.append(("baseline", baseline, _BASELINE_COLOR, "--"))
    else:
        ax.plot([0, 1], [0, 1], color=_BASELINE_COLOR, linestyle=":", label="chance")
    for label, scores, color, style in series:
        fpr, tpr = roc_curve(y, scores)
        # The trapezoidal area of the full curve is roc_auc (ties count half), without a re-sort.
        auc = float(np.trapezoid(tpr, fpr))
        ax.plot(*_thin(fpr, tpr), color=color, linestyle=style, label=f"{label} (AUC = {auc:.3f})")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), title=f"ROC curve ({split})")
    ax.set(xlabel="False positive rate", ylabel="True positive rate")
    ax.legend(loc="lower right")
    return figure


def _pr_plot(y: np.ndarray, p: np.ndarray, baseline: np.ndarray | None, split: str) -> Figure:
    figure = _figure(5.5, 5.0)
    ax = figure.add_subplot()
    series = [("model", p, _MODEL_COLOR, "-")]
    if baseline is not None:
        series.append(("baseline", baseline, _BASELINE_COLOR, "--"))
    for label, scores, color, style in series:
        recall, precision = pr_curve(y, scores)
        # Precision held over each recall increment: the step area is pr_auc (average precision).
        ap = float(np.sum(np.diff(recall) * precision[1:]))
        ax.step(
            *_thin(recall, precision),
            where="pre",
            color=color,
            linestyle=style,
            label=f"{label} (AP = {ap:.3f})",
        )
    ax.set(xlim=(0, 1), ylim=(0, 1.01), title=f"Precision-recall curve ({split})")
    ax.set(xlabel="Recall", ylabel="Precision")
    ax.legend(loc="upper right")
    return figure


def _calibration_plot(y: np.ndarray, p: np.ndarray, split: str) -> Figure:
    figure = _figure(5.5, 6.0)
    top, bottom = figure.subplots(
        2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1], "hspace": 0.3}
    )
    predicted, observed, _ = calibration_curve(y, p, bins=10, strategy="quantile")
    top.plot([0, 1], [0, 1], color=_BASELINE_COLOR, linestyle=":", label="perfectly calibrated")
    top.plot(predicted, observed, marker="o", color=_MODEL_COLOR, label="model (quantile bins)")
    top.set(xlim=(0, 1), ylim=(0, 1), title=f"Calibration ({split})")
    top.set(ylabel="Fraction of positives")
    top.legend(loc="upper left")
    bottom.hist(p, bins=50, range=(0, 1), color=_MODEL_COLOR)
    bottom.set(title="Predicted probabilities", xlabel="Predicted P(class 1)", ylabel="Rows")
    return figure


def _residuals_plot(y: np.ndarray, p: np.ndarray, split: str) -> Figure:
    figure = _figure()
    ax = figure.add_subplot()
    index = _subsample(len(y))
    alpha = 0.6 if len(index) <= 2_000 else 0.15
    ax.scatter(p[index], y[index] - p[index], s=4, alpha=alpha, color=_MODEL_COLOR, linewidths=0)
    ax.axhline(0, color="black", linewidth=1)
    shown = f"{len(index):,} of {len(y):,} rows" if len(index) < len(y) else f"{len(y):,} rows"
    ax.set(title=f"Residuals vs predicted ({split}, {shown})")
    ax.set(xlabel="Predicted", ylabel="Residual (actual - predicted)")
    return figure


def _predicted_vs_actual_plot(y: np.ndarray, p: np.ndarray, split: str) -> Figure:
    figure = _figure(5.5, 5.0)
    ax = figure.add_subplot()
    index = _subsample(len(y))
    actual, predicted = y[index], p[index]
    finite = np.isfinite(actual) & np.isfinite(predicted)
    if finite.any():
        cells = ax.hexbin(
            actual[finite], predicted[finite], gridsize=50, mincnt=1, bins="log", cmap="Blues"
        )
        figure.colorbar(cells, ax=ax, label="Rows (log scale)")
        low = float(min(actual[finite].min(), predicted[finite].min()))
        high = float(max(actual[finite].max(), predicted[finite].max()))
        ax.plot([low, high], [low, high], color="black", linewidth=1, label="y = x")
        ax.legend(loc="upper left")
    shown = f"{len(index):,} of {len(y):,} rows" if len(index) < len(y) else f"{len(y):,} rows"
    ax.set(title=f"Predicted vs actual ({split}, {shown})", xlabel="Actual", ylabel="Predicted")
    return figure


def _confusion_plot(y: np.ndarray, p: np.ndarray, class_names: list[str], split: str) -> Figure:
    k = p.shape[1]
    predicted = np.argmax(p, axis=1)
    counts = np.bincount(y * k + predicted, minlength=k * k).reshape(k, k).astype(float)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    side = min(max(4.5, 0.5 * k + 2), 14)
    figure = _figure(side + 1, side)
    ax = figure.add_subplot()
    image = ax.imshow(normalised, vmin=0, vmax=1, cmap="Blues")
    figure.colorbar(image, ax=ax, label="Share of the true class")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    if k <= 15:
        for i in range(k):
            for j in range(k):
                value = normalised[i, j]
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if value > 0.5 else "black",
                )
    ax.set(title=f"Confusion matrix ({split}, rows normalised)")
    ax.set(xlabel="Predicted class", ylabel="True class")
    return figure


def _importance_plot(importance: Mapping[str, float]) -> Figure:
    top = sorted(importance.items(), key=lambda item: -float(item[1]))[:TOP_FEATURES]
    figure = _figure(6.5, max(2.5, 0.28 * len(top) + 1.2))
    ax = figure.add_subplot()
    if top:
        names = [name for name, _ in reversed(top)]
        ax.barh(names, [float(gain) for _, gain in reversed(top)], color=_MODEL_COLOR)
        ax.tick_params(axis="y", labelsize=8)
    else:
        ax.text(0.5, 0.5, "no feature importance recorded", ha="center", va="center")
    ax.set(title=f"Feature importance (gain, top {min(len(importance), TOP_FEATURES)})")
    ax.set(xlabel="Total gain", ylabel="Feature")
    return figure


def evaluation_plots(
    task: str,
    y_true: Any,
    y_pred: Any,
    importance: Mapping[str, float],
    baseline_pred: Any = None,
    class_names: list[str] | None = None,
    *,
    split: str = "test",
) -> dict[str, bytes]:
    """PNG plots of a model's predictions on one split (named in the titles), by plot name.

    binary: "roc", "pr" (model and baseline), "calibration"; regression: "residuals",
    "predicted_vs_actual"; multiclass: "confusion"; every task: "importance" (top 25 by gain).
    """
    if task not in METRICS:
        raise ValueError(f"task must be one of {sorted(METRICS)}; found {task!r}")
    figures: dict[str, Figure] = {}
    if task in ("binary", "regression"):
        y = np.asarray(y_true, dtype=np.float64)
        p = np.asarray(y_pred, dtype=np.float64)
        if y.ndim != 1 or p.shape != y.shape:
            raise ValueError(
                f"y_true and y_pred must be 1-d arrays of the same length; "
                f"found shapes {y.shape} and {p.shape}"
            )
    if task == "binary":
        baseline = None if baseline_pred is None else np.asarray(baseline_pred, dtype=np.float64)
        figures["roc"] = _roc_plot(y, p, baseline, split)
        figures["pr"] = _pr_plot(y, p, baseline, split)
        figures["calibration"] = _calibration_plot(y, p, split)
    elif task == "regression":
        figures["residuals"] = _residuals_plot(y, p, split)
        figures["predicted_vs_actual"] = _predicted_vs_actual_plot(y, p, split)
    else:
        y = np.asarray(y_true).astype(np.int64)
        p = np.asarray(y_pred, dtype=np.float64)
        if p.ndim != 2 or p.shape[0] != len(y):
            raise ValueError(
                f"y_pred of a multiclass task must be an (n, k) probability matrix with "
                f"n = {len(y)}; found shape {p.shape}"
            )
        k = p.shape[1]
        if class_names is None:
            names = [str(i) for i in range(k)]
        else:
            names = [str(name) for name in class_names]
        if len(names) != k:
            raise ValueError(
                f"class_names must name the {k} columns of y_pred; found {len(names)} names"
            )
        figures["confusion"] = _confusion_plot(y, p, names, split)
    figures["importance"] = _importance_plot(importance)
    return {name: plot_png(figure) for name, figure in figures.items()}


# -- tables ---------------------------------------------------------------------------------

SIGNIFICANT_DIGITS = 4


def round_sig(value: float | None, digits: int = SIGNIFICANT_DIGITS) -> float | None:
    """`value` to `digits` significant digits (0.7429461945 -> 0.7429, 1234567.8 -> 1235000.0);
    None for None, NaN and infinities, so metadata never shows 16 digits or a non-number."""
    if value is None:
        return None
    number = float(value)
    if not math.isfinite(number):
        return None
    return float(f"{number:.{digits}g}")


def rounded(value: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """The same structure (dicts, lists) with every float at `digits` significant digits."""
    if isinstance(value, Mapping):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(item, digits) for item in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, float | np.floating):
        return round_sig(value, digits)
    return value


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        number = float(value)
        if not math.isfinite(number):
            return "n/a"
        return f"{number:,.1f}" if abs(number) >= 1000 else f"{number:.4f}"
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(_json_ready(value), ensure_ascii=False)
    return str(value)


def _metric_columns(report: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(column header, metrics): test, valid, other splits, the baseline's, the champion's."""
    splits = report.get("metrics") or {}
    ordered = [s for s in ("test", "valid") if s in splits] + [
        s for s in splits if s not in ("test", "valid")
    ]
    columns = [(split, splits[split] or {}) for split in ordered]
    for split, metrics in (report.get("baseline") or {}).items():
        columns.append((f"baseline ({split})", metrics or {}))
    champion = report.get("champion")
    # The champion scored on the same test rows, when the pipeline passes it along.
    if isinstance(champion, Mapping) and isinstance(champion.get("test"), Mapping):
        version = champion.get("version")
        label = f"champion {version} (test)" if version else "champion (test)"
        columns.append((label, champion["test"]))
    return columns


def _metric_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the metrics table, the task's metrics first."""
    columns = _metric_columns(report)
    names = list(METRICS.get(str(report.get("task")), []))
    for _, metrics in columns:
        names += [name for name in metrics if name not in names]
    primary = PRIMARY.get(str(report.get("task")))
    header = ["metric", *[label for label, _ in columns]]
    rows = [
        [f"{name} (primary)" if name == primary else name]
        + [_format(metrics.get(name)) for _, metrics in columns]
        for name in names
        if any(name in metrics for _, metrics in columns)
    ]
    return header, rows


def metrics_markdown(report: Mapping[str, Any]) -> str:
    """The test / valid / baseline metrics as a markdown table (for Dagster metadata)."""
    header, rows = _metric_rows(report)
    if not rows:
        return "_No metrics in the report._"
    lines = [
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return "\n".join(lines)


# -- files ----------------------------------------------------------------------------------


def _json_ready(value: Any) -> Any:
    """The same structure with NaN/inf as None and numpy values as Python ones."""
    if isinstance(value, Mapping):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_json_ready(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    return value


def _write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)  # mkstemp creates 0600; reports are meant to be shared
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; }
.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.92rem; }
th, td { border: 1px solid #ddd; padding: 0.3rem 0.7rem; }
th { background: #f4f4f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.decision { padding: 0.6rem 1rem; border-radius: 4px; display: inline-block; font-weight: 600; }
.promoted { background: #e3f4e3; color: #1b5e20; }
.refused { background: #fdecea; color: #b71c1c; }
.plots { display: flex; flex-wrap: wrap; gap: 1.5rem; }
figure { margin: 0; }
figcaption { color: #555; font-size: 0.9rem; }
img { max-width: 100%; }
"""


def _html_table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{html.escape(cell)}</td>'
            if i >= numeric_from
            else f"<td>{html.escape(cell)}</td>"
            for i, cell in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _records_html(records: list[Mapping[str, Any]], first: str | None = None) -> str:
    """A table of dicts: one row each, one column per key seen (`first` leading)."""
    header: list[str] = []
    for record in records:
        header += [key for key in record if key not in header]
    if first in header:
        header.remove(first)
        header.insert(0, first)
    rows = [[_format(record.get(key)) for key in header] for record in records]
    return _html_table(header, rows)


def _is_records(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


_DECISIONS = {"promote": True, "promoted": True, "refuse": False, "refused": False}


def _promotion_html(promotion: Any) -> str:
    """The decision as a badge, then its details; a list of dicts (the checks) as a table."""
    parts = ["<h2>Promotion</h2>"]
    if not isinstance(promotion, Mapping):
        parts.append(f"<p>{html.escape(_format(promotion))}</p>")
        return "\n".join(parts)
    promoted = promotion.get("promoted")
    if not isinstance(promoted, bool | np.bool_):
        promoted = _DECISIONS.get(str(promotion.get("decision", "")).lower())
    if promoted is not None:
        css, text = ("promoted", "Promoted") if promoted else ("refused", "Not promoted")
        parts.append(f'<p class="decision {css}">{text}</p>')
    if promotion.get("reason"):
        parts.append(f"<p>{html.escape(str(promotion['reason']))}</p>")
    details = [
        [str(key), _format(value)]
        for key, value in promotion.items()
        if key not in ("reason", "promoted", "decision") and not _is_records(value)
    ]
    if details:
        parts.append(_html_table(["detail", "value"], details, numeric_from=2))
    for key, value in promotion.items():
        if _is_records(value):
            parts.append(f"<h3>{html.escape(str(key))}</h3>\n{_records_html(value)}")
    return "\n".join(parts)


def _slices_html(report: Mapping[str, Any]) -> str:
    """One table per slice column: `slices_by_column` when present, else `slices`."""
    by_column = report.get("slices_by_column")
    if not isinstance(by_column, Mapping) or not by_column:
        slices = report.get("slices")
        if not isinstance(slices, Mapping) or not slices.get("rows"):
            return ""
        by_column = {slices.get("column") or "": slices["rows"]}
    sections = []
    for column, rows in by_column.items():
        if not _is_records(rows):
            continue
        name = html.escape(str(column))
        title = f"Metrics by <code>{name}</code> (test)" if name else "Metrics by slice (test)"
        sections.append(f"<h2>{title}</h2>\n{_records_html(rows, first='slice')}")
    return "\n".join(sections)


def _report_html(report: Mapping[str, Any], plots: Mapping[str, bytes]) -> str:
    dataset = str(report.get("dataset", "unknown dataset"))
    version = str(report.get("model_version", "unknown"))
    meta = [f"task: {html.escape(str(report.get('task', 'unknown')))}"]
    meta.append(f"model version: <code>{html.escape(version)}</code>")
    if isinstance(report.get("rows"), Mapping):
        counts = ", ".join(f"{split} {_format(n)}" for split, n in report["rows"].items())
        meta.append(f"rows: {html.escape(counts)}")

    sections = [
        f"<h1>Evaluation: {html.escape(dataset)}</h1>",
        f'<p class="meta">{" · ".join(meta)}</p>',
    ]
    if report.get("promotion") is not None:
        sections.append(_promotion_html(report["promotion"]))
    header, rows = _metric_rows(report)
    sections.append("<h2>Metrics</h2>")
    sections.append(_html_table(header, rows) if rows else "<p>No metrics in the report.</p>")
    sections.append(_slices_html(report))
    if plots:
        figures = "".join(
            "<figure>"
            f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" '
            f'alt="{html.escape(PLOT_TITLES.get(name, name))}">'
            f"<figcaption>{html.escape(PLOT_TITLES.get(name, name))}</figcaption>"
            "</figure>"
            for name, png in plots.items()
        )
        sections.append(f'<h2>Plots</h2>\n<div class="plots">{figures}</div>')

    title = html.escape(f"Evaluation: {dataset}, model {version}")
    body = "\n".join(section for section in sections if section)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def write_report(
    directory: Path, report: Mapping[str, Any], plots: Mapping[str, bytes]
) -> tuple[Path, Path]:
    """Write `evaluation.json` (the report as given, NaN as null) and a self-contained
    `evaluation.html` (metrics, slices, plots, promotion decision) into `directory`, each
    atomically. Returns (json path, html path).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "evaluation.json"
    html_path = directory / "evaluation.html"
    text = json.dumps(_json_ready(report), indent=2, allow_nan=False, ensure_ascii=False)
    _write_atomic(json_path, text + "\n")
    _write_atomic(html_path, _report_html(report, plots))
    return json_path, html_path
