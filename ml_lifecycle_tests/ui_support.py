"""Helpers for the browser test: a `dagster dev` subprocess on loopback and the Dagster UI pages
it drives through Playwright (Debian's chromium, no browser download).

The Dagster production UI (checked with dagster-webserver 1.13) has almost no test ids: pages
are found by route (`/asset-groups`, `/locations/<location>/asset-groups/<group>`,
`/locations/<location>/jobs/<job>`, `/runs/<id>`, `/assets/<key>`), role, text and `data-tooltip` (an asset node's key, a group box's name).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
# A fresh browser profile shows Dagster's community pop-up over every page.
DISMISS_COMMUNITY_POPUP = "localStorage.setItem('communityNux','1')"
LOCATION = "ml_lifecycle"  # workspace.yaml's location_name
HOST = "127.0.0.1"

GRAPH_VIEWPORT = (1600, 640)  # widened when the lineage is too big to draw full nodes
MINIMAL_SCALE = 0.6  # Dagster draws bare, truncated node names below this zoom (AssetGraphExplorer)
RUN_DONE_OK = "[SUCCESS]"  # in a run page's title
RUN_DONE_BAD = ("[FAILURE]", "[CANCELED]", "[CANCELING]")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def dagster_executable() -> str:
    beside = Path(sys.executable).with_name("dagster")
    if beside.exists():
        return str(beside)
    found = shutil.which("dagster")
    if found is None:
        raise RuntimeError("the `dagster` command is not installed")
    return found


class DagsterDev:
    """`dagster dev -w workspace.yaml` (webserver + daemon + code server) in its own process
    group, so `stop()` ends all of them."""

    def __init__(self, repo_root: Path, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [dagster_executable(), "dev", "-w", "workspace.yaml", "-h", HOST, "-p", str(self.port)],
            cwd=repo_root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_until_up(self, timeout: float) -> float:
        """Seconds until /server_info answered; raises when the process dies or time runs out."""
        started = time.monotonic()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"dagster dev exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=5) as answer:
                    if answer.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() - started > timeout:
                raise TimeoutError(
                    f"dagster dev did not answer on {self.url} within {timeout:.0f}"
                    f" s:\n{self.log_tail()}"
                )
            time.sleep(1)

    def stop(self, grace: float = 20) -> None:
        """SIGTERM to the whole group, then SIGKILL to whatever is left of it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self._log.close()


# --- pages -----------------------------------------------------------------------------------


def _svg_box(locator: Any) -> tuple[float, float, float, float]:
    """(x, y, width, height) of a foreignObject in graph coordinates (independent of zoom)."""
    return tuple(float(locator.get_attribute(name)) for name in ("x", "y", "width", "height"))


def _open_lineage(page: Any, base_url: str, expected_assets: int) -> None:
    from playwright.sync_api import expect

    page.goto(f"{base_url}/asset-groups")
    expect(page.locator("foreignObject.group").first).to_be_visible()
    hide_navigation = page.get_by_role("button", name="Hide navigation")
    if hide_navigation.is_visible():
        hide_navigation.click()
    # The unlabeled button right after "Jump to…" collapses the asset tree on the left.
    jump_to = page.get_by_placeholder("Jump to…")
    if jump_to.is_visible():
        jump_to.locator("xpath=following::button[1]").click()
    drawn = page.locator("foreignObject:not(.group)").filter(
        has_not=page.locator('[class*="groupOutlineBox"]')
    )
    if drawn.count() == 0:
        page.keyboard.press("Alt+E")  # groups start collapsed; Alt+E expands them all
    expect(drawn).to_have_count(expected_assets)
    page.wait_for_timeout(500)  # the graph zooms to fit after expanding


def _zoom(page: Any) -> float:
    group = page.locator("foreignObject.group").first
    return group.bounding_box()["width"] / float(group.get_attribute("width"))


def show_whole_graph(page: Any, base_url: str, expected_assets: int) -> None:
    """Open the global lineage with navigation and sidebar hidden and every group expanded, on a
    page wide enough that the graph, zoomed to fit, draws full nodes ("Latest event", key in
    `data-tooltip`): when the first try is zoomed out too far, the page is widened to match."""
    from playwright.sync_api import expect

    width, height = GRAPH_VIEWPORT
    page.set_viewport_size({"width": width, "height": height})
    _open_lineage(page, base_url, expected_assets)
    for _ in range(2):
        if asset_nodes(page).count() == expected_assets:
            break
        factor = MINIMAL_SCALE * 1.1 / _zoom(page)
        width, height = round(width * factor), round(height * factor)
        page.set_viewport_size({"width": min(width, 4000), "height": min(height, 2400)})
        _open_lineage(page, base_url, expected_assets)
    expect(asset_nodes(page)).to_have_count(expected_assets)
    expect(page.get_by_text("Loading...", exact=True)).to_have_count(0)


def asset_nodes(page: Any) -> Any:
    return page.locator("foreignObject").filter(has_text="Latest event")


def assets_by_group_in_graph(page: Any) -> dict[str, str]:
    """asset key -> the expanded group box that contains its node, read from the drawn graph."""
    groups = {}
    for group in page.locator("foreignObject.group").all():
        groups[group.locator("[data-tooltip]").first.get_attribute("data-tooltip")] = _svg_box(
            group
        )
    found = {}
    for node in asset_nodes(page).all():
        key = node.locator("[data-tooltip]").first.get_attribute("data-tooltip")
        x, y, w, h = _svg_box(node)
        cx, cy = x + w / 2, y + h / 2
        inside = [
            name
            for name, (gx, gy, gw, gh) in groups.items()
            if gx <= cx <= gx + gw and gy <= cy <= gy + gh
        ]
        found[key] = inside[0] if len(inside) == 1 else f"<in {inside}>"
    return found


def graph_clip(page: Any, margin: int = 16) -> dict[str, float]:
    """The screen rectangle around every group box (for a tight picture of the lineage)."""
    boxes = [g.bounding_box() for g in page.locator("foreignObject.group").all()]
    left = min(b["x"] for b in boxes) - margin
    top = min(b["y"] for b in boxes) - margin
    right = max(b["x"] + b["width"] for b in boxes) + margin
    bottom = max(b["y"] + b["height"] for b in boxes) + margin
    return {
        "x": max(left, 0),
        "y": max(top, 0),
        "width": right - max(left, 0),
        "height": bottom - max(top, 0),
    }


def materialize_group_from_ui(
    page: Any, base_url: str, group: str, keys: list[str], timeout_ms: int = 60_000
) -> str:
    """Click "Materialize all" on the group's page; returns the launched run's full id. The
    run is named __ASSET_JOB (a group page prefers no job): use `materialize_job_from_ui`."""
    from playwright.sync_api import expect

    page.goto(f"{base_url}/locations/{LOCATION}/asset-groups/{group}")
    for key in keys:  # the group's graph is drawn: the button covers all of them
        expect(page.locator(f'[data-tooltip="{key}"]').first).to_be_visible()
    return _materialize_all(page, base_url, f"group {group}", timeout_ms)


def materialize_job_from_ui(
    page: Any, base_url: str, job: str, keys: list[str], timeout_ms: int = 60_000
) -> str:
    """Click "Materialize all" on an asset job's page: the run is named after the job."""
    from playwright.sync_api import expect

    page.goto(f"{base_url}/locations/{LOCATION}/jobs/{job}")
    # The header counts the job's assets (the graph may not fit them all on screen).
    expect(page.get_by_text(f"View {len(keys)} assets", exact=True)).to_be_visible()
    expect(page.locator("foreignObject").first).to_be_attached()  # the graph is drawn
    return _materialize_all(page, base_url, f"job {job}", timeout_ms)


def graphql(base_url: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    """The `data` of one query to the webserver's GraphQL API."""
    body = json.dumps({"query": query, "variables": variables}).encode()
    request = urllib.request.Request(
        f"{base_url}/graphql", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())["data"]


def run_info(base_url: str, run_id: str) -> dict[str, Any]:
    """The run's job name, status and tags, from the webserver's GraphQL API."""
    query = (
        "query($id: ID!) { runOrError(runId: $id) { ... on Run { jobName status "
        "tags { key value } } } }"
    )
    run = graphql(base_url, query, {"id": run_id})["runOrError"]
    run["tags"] = {tag["key"]: tag["value"] for tag in run.get("tags", [])}
    return run


def recent_runs(base_url: str, limit: int = 50) -> list[dict[str, Any]]:
    """The latest runs' ids, job names and tags, from the webserver's GraphQL API."""
    query = (
        "query($limit: Int) { runsOrError(limit: $limit) { ... on Runs { results { runId "
        "jobName status tags { key value } } } } }"
    )
    runs = graphql(base_url, query, {"limit": limit})["runsOrError"]["results"]
    for run in runs:
        run["tags"] = {tag["key"]: tag["value"] for tag in run.get("tags", [])}
    return runs


def _materialize_all(page: Any, base_url: str, where: str, timeout_ms: int) -> str:
    from playwright.sync_api import expect

    button = page.get_by_role("button", name="Materialize all")  # name: icon + label
    expect(button).to_be_enabled()
    button.click()
    toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
    deadline = time.monotonic() + timeout_ms / 1000
    while not toast.is_visible():
        # Some launches ask first (launchpad, missing upstream data, ...): confirm them.
        dialog = page.get_by_role("dialog")
        if dialog.count() and dialog.first.is_visible():
            confirm = dialog.first.get_by_role(
                "button", name=re.compile(r"^(Launch run|Materialize.*|Confirm|Continue)$")
            )
            if confirm.count():
                confirm.last.click()
        if time.monotonic() > deadline:
            raise TimeoutError(f"no 'Launched run' toast after materializing {where}")
        page.wait_for_timeout(250)
    short_id = re.search(r"[0-9a-f]{8}", toast.first.inner_text()).group(0)
    run_page = re.compile(rf"/runs/{short_id}-[0-9a-f-]{{27}}")
    try:  # the toast's "View" opens the run
        view = page.get_by_role("button", name="View", exact=True).or_(
            page.get_by_role("link", name="View", exact=True)
        )
        view.first.click(timeout=5_000)
        page.wait_for_url(run_page, timeout=15_000)
    except Exception:  # the toast went away: the runs list links to the full id
        page.goto(f"{base_url}/runs")
        link = page.locator(f'a[href^="/runs/{short_id}-"]').first
        expect(link).to_be_visible()
        link.click()
        page.wait_for_url(run_page)
    return page.url.split("/runs/", 1)[1].split("?", 1)[0]


def wait_for_run(page: Any, base_url: str, run_id: str, timeout: float) -> str:
    """Open the run's page and wait until its title reports the end; returns the title."""
    if f"/runs/{run_id}" not in page.url:
        page.goto(f"{base_url}/runs/{run_id}")
    started = last_reload = time.monotonic()
    while True:
        title = page.title()
        if RUN_DONE_OK in title:
            return title
        if any(mark in title for mark in RUN_DONE_BAD):
            raise AssertionError(f"run {run_id} ended badly: {title}")
        now = time.monotonic()
        if now - started > timeout:
            raise TimeoutError(f"run {run_id} not finished after {timeout:.0f} s: {title!r}")
        if now - last_reload > 30:  # the page subscribes to run updates; reload as a fallback
            page.reload()
            last_reload = now
        page.wait_for_timeout(1000)
