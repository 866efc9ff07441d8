"""The Dagster UI end to end, in a real headless Chromium: `dagster dev` on a free loopback port
with a fresh home and a small synthetic dataset; the lineage shows every lifecycle asset in its
group; `data_pipeline` and then `training_pipeline` are launched by clicking "Materialize all"
on their job pages (so the runs carry the job's name, not __ASSET_JOB); the evaluation report's
plots render inline on its asset page, with no click. Screenshots go to artifacts/ui/ (and the
lineage picture to docs/asset-graph.png, shown by the README).

Needs Debian's `chromium` (/usr/bin/chromium) and the `playwright` Python package (no
`playwright install`: the system browser is used); skipped when either is missing.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ml_lifecycle_tests.ui_support import (
    CHROMIUM,
    CHROMIUM_ARGS,
    DISMISS_COMMUNITY_POPUP,
    DagsterDev,
    asset_nodes,
    assets_by_group_in_graph,
    graph_clip,
    materialize_job_from_ui,
    recent_runs,
    run_info,
    show_whole_graph,
    wait_for_run,
)

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="the `playwright` Python package is not installed"
)
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)

from ml_lifecycle.definitions import build_definitions  # noqa: E402
from ml_lifecycle.spec import load_spec  # noqa: E402
from ml_lifecycle_tests.test_training import write_dataset  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO_ROOT / "artifacts" / "ui"
README_PICTURE = REPO_ROOT / "docs" / "asset-graph.png"
SERVER_START_TIMEOUT = 180  # s; importing the code location is most of it
RUN_TIMEOUT = 180  # s per run
VIEWPORT = {"width": 1600, "height": 900}


@pytest.fixture
def spec_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ML_LIFECYCLE_HOME", str(tmp_path / "home"))
    return write_dataset(tmp_path / "dataset", "binary", rows=3000)


@pytest.fixture
def dagster_ui(spec_path: Path, tmp_path: Path) -> Iterator[DagsterDev]:
    """`dagster dev` with a fresh DAGSTER_HOME (the repo's dagster.yaml) and ML_LIFECYCLE_HOME."""
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(dagster_home),
        "ML_LIFECYCLE_HOME": str(tmp_path / "home"),
        "ML_LIFECYCLE_DATASET": str(spec_path),
    }
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    server = DagsterDev(REPO_ROOT, env, tmp_path / "dagster-dev.log")
    try:
        seconds = server.wait_until_up(SERVER_START_TIMEOUT)
        print(f"\ndagster dev answered on {server.url} after {seconds:.0f} s")
        yield server
    finally:
        server.stop()
        shutil.copy(server.log_path, ARTIFACTS / "dagster-dev.log")


@pytest.fixture
def browser() -> Iterator[object]:
    playwright_api.expect.set_options(timeout=30_000)
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            chromium.close()


def new_page(browser, viewport: dict[str, int]):
    context = browser.new_context(viewport=viewport)
    context.add_init_script(DISMISS_COMMUNITY_POPUP)
    context.set_default_timeout(30_000)
    return context.new_page()


def test_lifecycle_in_the_dagster_ui(spec_path: Path, dagster_ui: DagsterDev, browser):
    expect = playwright_api.expect
    started = time.monotonic()
    defs = build_definitions(load_spec(spec_path))
    groups = {spec.key.to_user_string(): spec.group_name for spec in defs.resolve_all_asset_specs()}
    by_group = {g: sorted(k for k, kg in groups.items() if kg == g) for g in set(groups.values())}
    # The two stages this test launches (other groups, e.g. serving, are only looked at).
    assert {"cleaned", "features"} < set(by_group["data"])
    assert any(k.startswith("raw_") for k in by_group["data"])
    assert set(by_group["training"]) == {"model", "evaluation_report", "champion"}
    launched = by_group["data"] + by_group["training"]
    job_assets = {
        job: sorted(
            k.to_user_string() for k in defs.resolve_job_def(job).asset_layer.selected_asset_keys
        )
        for job in ("data_pipeline", "training_pipeline")
    }
    assert job_assets["data_pipeline"] == by_group["data"]
    assert set(launched) <= set(job_assets["training_pipeline"])

    base = dagster_ui.url
    page = new_page(browser, VIEWPORT)
    step, step_started, timings = "lineage", time.monotonic(), []

    def next_step(name: str) -> None:
        nonlocal step, step_started
        timings.append(f"{step} {time.monotonic() - step_started:.0f} s")
        step, step_started = name, time.monotonic()

    try:
        # a. The lineage: every lifecycle asset, drawn inside its group's box.
        show_whole_graph(page, base, expected_assets=len(groups))
        assert assets_by_group_in_graph(page) == groups
        page.screenshot(path=ARTIFACTS / "01-asset-graph.png")

        # b. The data stage, launched from its job's page: the run is named data_pipeline.
        next_step("data run")
        page.set_viewport_size(VIEWPORT)
        run_id = materialize_job_from_ui(page, base, "data_pipeline", job_assets["data_pipeline"])
        print(f"data stage: run {run_id}")
        wait_for_run(page, base, run_id, RUN_TIMEOUT)
        count = len(job_assets["data_pipeline"])
        expect(page.get_by_text(f"{count} assets", exact=True)).to_be_visible()
        expect(page.get_by_text("Success", exact=True).first).to_be_visible()
        assert run_info(base, run_id)["jobName"] == "data_pipeline"
        page.screenshot(path=ARTIFACTS / "02-data-run.png")

        # c. The main job the same way (stage 1 again, then training and promotion).
        next_step("training run")
        run_id = materialize_job_from_ui(
            page, base, "training_pipeline", job_assets["training_pipeline"]
        )
        print(f"training stage: run {run_id}")
        wait_for_run(page, base, run_id, RUN_TIMEOUT)
        count = len(job_assets["training_pipeline"])
        expect(page.get_by_text(f"{count} assets", exact=True)).to_be_visible()
        assert run_info(base, run_id)["jobName"] == "training_pipeline"
        page.screenshot(path=ARTIFACTS / "03-training-run.png")

        # d. The evaluation report's asset page shows its plots inline: no dialog to open.
        next_step("evaluation report")
        page.set_viewport_size({"width": VIEWPORT["width"], "height": 2400})
        page.goto(f"{base}/assets/evaluation_report")
        expect(page.get_by_text("Test and validation metrics", exact=False).first).to_be_visible()
        for label in ("test_roc_auc", "promotion_decision", "plot_roc", "plot_importance"):
            expect(page.get_by_text(label, exact=True).first).to_be_visible()
        expect(page.get_by_role("dialog")).to_have_count(0)
        inline = page.locator('img[src^="/logs/ml_lifecycle_plots/evaluation_report/"]')
        expect(inline).to_have_count(4)  # roc, pr, calibration, importance
        expect(inline.first).to_be_visible()
        widths = [
            img.evaluate("e => e.decode().then(() => e.naturalWidth)") for img in inline.all()
        ]
        assert all(w > 100 for w in widths), widths  # real plots, fetched from the webserver
        inline.first.scroll_into_view_if_needed()
        page.screenshot(path=ARTIFACTS / "04-evaluation-plots-inline.png", full_page=True)
        print(f"evaluation_report: {len(widths)} plots inline, widths {widths}")

        # The same PNGs, base64 in the event log, behind "[Show Markdown]" (any storage).
        plots_row = page.locator("tr").filter(has=page.get_by_text("plots", exact=True))
        plots_row.first.get_by_text("[Show Markdown]").click()
        images = page.get_by_role("dialog").locator('img[src^="data:image/png;base64,"]')
        expect(images.first).to_be_visible()
        assert images.count() == len(widths)
        page.screenshot(path=ARTIFACTS / "05-evaluation-plots-dialog.png")
        page.keyboard.press("Escape")
        page.set_viewport_size(VIEWPORT)

        # The lineage again, both stages materialized: the README's picture (cropped).
        next_step("final lineage")
        show_whole_graph(page, base, expected_assets=len(groups))
        for key in launched:
            node = asset_nodes(page).filter(has=page.locator(f'[data-tooltip="{key}"]'))
            expect(node).not_to_contain_text("Never materialized")
        page.screenshot(path=ARTIFACTS / "06-asset-graph-materialized.png")
        README_PICTURE.parent.mkdir(exist_ok=True)
        page.screenshot(path=README_PICTURE, clip=graph_clip(page))

        # Runs say what started them: the landing sensor's runs (it found the landing files at
        # start-up) are data_pipeline runs tagged with their trigger.
        by_sensor = [
            r
            for r in recent_runs(base)
            if r["tags"].get("ml_lifecycle/trigger") == "landing_sensor"
        ]
        assert by_sensor and {r["jobName"] for r in by_sensor} == {"data_pipeline"}, by_sensor
    except Exception:
        if not page.is_closed():
            page.screenshot(path=ARTIFACTS / "failure.png")
        print(f"failed at step {step!r}; dagster dev log tail:\n{dagster_ui.log_tail()}")
        raise
    next_step("done")
    print(
        f"browser test: {time.monotonic() - started:.0f} s after the server was up "
        f"({', '.join(timings)})"
    )
