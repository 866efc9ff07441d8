"""Plots that the Dagster UI shows inline, on the asset page and in the lineage sidebar.

Dagster 1.13 has no image metadata type, and its UI renders a markdown metadata value inline
only when the markdown is shorter than 1,000 characters (`MetadataEntry` with
`expandSmallValues`); a base64 PNG is far longer and hides behind "[Show Markdown]". So each
PNG is written where the webserver already serves files, the instance's local compute-log
folder (route `/logs/<folders>/<name>/<extension>`), and the metadata entry is a one-line
markdown image pointing there. The PNG is also kept in one "[Show Markdown]" entry (base64) by
the assets: that copy lives in the event log and works with any compute-log storage.
"""

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import dagster as dg

FOLDER = "ml_lifecycle_plots"
ROUTE = "/logs"  # dagster-webserver's compute-log download route (no --path-prefix)
INLINE_MARKDOWN_LIMIT = 1000  # the UI shows longer markdown only in a dialog


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def inline_plots(
    instance: dg.DagsterInstance,
    asset: str,
    run_id: str,
    plots: Mapping[str, bytes],
    titles: Mapping[str, str] | None = None,
) -> dict[str, dg.MetadataValue]:
    """`plot_<name>` -> a markdown image the UI renders inline, for every PNG in `plots`.

    Empty when the instance keeps compute logs somewhere the webserver does not read files from
    (a no-op manager in tests, cloud storage): the caller's base64 entry is then the only copy.
    """
    manager = instance.compute_log_manager
    # Only the local manager: a cloud manager's webserver reads from the bucket, not our disk.
    if not hasattr(manager, "get_captured_local_path") or hasattr(manager, "local_manager"):
        return {}
    out: dict[str, dg.MetadataValue] = {}
    for name, png in plots.items():
        log_key = [FOLDER, asset, run_id, name]
        path = Path(manager.get_captured_local_path(log_key, "png"))
        _write_atomic(path, png)
        title = (titles or {}).get(name, name).replace("[", "(").replace("]", ")")
        markdown = f"![{title}]({ROUTE}/{'/'.join(log_key)}/png)"
        if len(markdown) >= INLINE_MARKDOWN_LIMIT:  # would not render inline: not worth a row
            continue
        out[f"plot_{name}"] = dg.MetadataValue.md(markdown)
    return out
