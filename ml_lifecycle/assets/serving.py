"""Stage 3 assets (group `serving`): the online feature snapshot and the Bento for the champion."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg

from ml_lifecycle.resources import Warehouse
from ml_lifecycle.serving.snapshot import current_snapshot, export_online_snapshot
from ml_lifecycle.settings import REPO_ROOT
from ml_lifecycle.spec import DatasetSpec
from ml_lifecycle.training.registry import ModelRegistry

GROUP = "serving"
SERVICE = "ml_lifecycle.serving.service:Predictor"


def bentoml_home(spec: DatasetSpec) -> Path:
    return spec.paths().root / "bentoml"


def build_serving_assets(spec: DatasetSpec) -> list[dg.AssetsDefinition]:
    paths = spec.paths()

    @dg.asset(
        name="online_features",
        group_name=GROUP,
        deps=["cleaned"],
        kinds={"duckdb", "parquet"},
        pool="duckdb",
        owners=spec.owners or None,
        tags={"stage": "serving"},
        automation_condition=dg.AutomationCondition.eager()
        & dg.AutomationCondition.all_deps_blocking_checks_passed(),
        description=(
            "The online feature snapshot the service loads: every reference table (the service "
            "looks up joined fields such as weather or plane facts itself, so a client sends only "
            "what it knows) and the history events that seed the online store of aggregates. "
            "Written to online/<stamp>/ and switched atomically."
        ),
    )
    def online_features(warehouse: Warehouse) -> dg.MaterializeResult:
        with warehouse.get_connection() as conn:
            folder, manifest = export_online_snapshot(conn, spec)
        rows = manifest["rows"]
        return dg.MaterializeResult(metadata={
            "snapshot": dg.MetadataValue.path(str(folder)),
            "reference_rows": sum(v for k, v in rows.items() if k.startswith("raw_")),
            "history_events": sum(v for k, v in rows.items() if k.startswith("events_")),
            "tables": dg.MetadataValue.json(rows),
        })

    @dg.asset(
        name="bento",
        group_name=GROUP,
        deps=["champion", online_features],
        kinds={"bentoml"},
        owners=spec.owners or None,
        tags={"stage": "serving"},
        automation_condition=dg.AutomationCondition.eager(),
        description=(
            "A Bento (`bentoml build`) for the current champion: the service code, the dataset "
            "spec, the champion's model version (LightGBM model, feature schema, fitted "
            "preprocessing state, reference profile) and the online snapshot. `make serve` serves "
            "the live registry instead, which follows promotions without a restart."
        ),
    )
    def bento(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        registry = ModelRegistry(paths.registry)
        champion = registry.alias("champion")
        if champion is None:
            raise dg.Failure("no champion to package: the promotion gate has not passed yet")
        context_dir = paths.root / "bento_build"
        shutil.rmtree(context_dir, ignore_errors=True)
        (context_dir / "datasets").mkdir(parents=True)
        shutil.copytree(REPO_ROOT / "ml_lifecycle", context_dir / "ml_lifecycle",
                        ignore=shutil.ignore_patterns("__pycache__"))
        spec_path = spec.spec_path
        assert spec_path is not None
        for sibling in spec_path.parent.glob(f"{spec_path.stem}*"):
            shutil.copy2(sibling, context_dir / "datasets" / sibling.name)
        # Inside the Bento the package's default home (`data/`) and spec (datasets/.default)
        # point at what is packaged, so it serves with no environment variables.
        (context_dir / "datasets" / ".default").write_text(spec_path.name)
        home = context_dir / "data" / spec.name
        shutil.copytree(paths.registry / "versions" / champion,
                        home / "registry" / "versions" / champion)
        (home / "registry" / "aliases.json").write_text(json.dumps({"champion": champion}))
        snapshot = current_snapshot(spec)
        shutil.copytree(snapshot, home / "online" / snapshot.name)
        (home / "online" / "CURRENT").write_text(snapshot.name)
        shutil.copy2(REPO_ROOT / "requirements.lock", context_dir / "requirements.txt")
        bentofile = {
            "service": SERVICE,
            "name": f"ml_lifecycle_{spec.name}",
            "labels": {"dataset": spec.name, "model_version": champion},
            "include": ["ml_lifecycle/**/*.py", "datasets/*", "datasets/.default", "data/**"],
            "python": {"requirements_txt": "requirements.txt"},
        }
        import yaml

        (context_dir / "bentofile.yaml").write_text(yaml.safe_dump(bentofile, sort_keys=False))
        env = {**os.environ, "BENTOML_HOME": str(bentoml_home(spec)),
               "ML_LIFECYCLE_HOME": str(context_dir / "data"),
               "ML_LIFECYCLE_DATASET": str(context_dir / "datasets" / spec_path.name)}
        bentoml_cli = Path(sys.executable).with_name("bentoml")
        result = subprocess.run(
            [str(bentoml_cli), "build", str(context_dir), "--output", "tag"],
            cwd=context_dir, env=env, capture_output=True, text=True, timeout=600, check=False)
        if result.returncode != 0:
            raise dg.Failure(f"bentoml build failed:\n{result.stderr[-3000:]}")
        tag = result.stdout.strip().splitlines()[-1].replace("__tag__:", "").strip()
        serve = (f"BENTOML_HOME={bentoml_home(spec)} bentoml serve {tag} "
                 f"--host 127.0.0.1 --port 3000")
        context.log.info(f"built {tag}; serve with: {serve}")
        return dg.MaterializeResult(metadata={
            "bento_tag": tag,
            "model_version": champion,
            "serve_command": dg.MetadataValue.md(f"```\n{serve}\n```"),
            "serve_live_registry": dg.MetadataValue.md("```\nmake serve\n```"),
        })

    return [online_features, bento]
