"""The production profile on the machine's PostgreSQL: deploy/production/dagster.yaml in a fresh
DAGSTER_HOME, a fresh database per session, the job CLI in separate processes. Two runs at once
both succeed and never hold the DuckDB warehouse together; runs and events land in PostgreSQL;
the automation evaluates against the same instance."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

from ml_lifecycle.definitions import build_definitions
from ml_lifecycle.settings import REPO_ROOT
from ml_lifecycle.spec import load_spec
from ml_lifecycle.training.cluster import EXECUTOR_ENV, SCHEDULER_ENV
from ml_lifecycle_tests.conftest import PG_HOST, PG_PORT
from ml_lifecycle_tests.test_training import write_dataset

pytestmark = pytest.mark.postgres

PROFILE = REPO_ROOT / "deploy" / "production" / "dagster.yaml"
DAGSTER = Path(sys.executable).with_name("dagster")
# Launched at the same moment, in two processes: the data job with the production executor (a
# process per step), the training job in its own process (kept fast). Their warehouse steps
# contend for pool "duckdb".
RUNS = {"data_pipeline": "multiprocess", "training_pipeline": "in_process"}
RUN_TIMEOUT = 600


def admin_connection() -> psycopg.Connection:
    return psycopg.connect(host=PG_HOST, port=PG_PORT, user="postgres", dbname="postgres",
                           autocommit=True)


@pytest.fixture(scope="module")
def database(postgres_url: str) -> Iterator[str]:
    """A fresh database for this session's Dagster instance, dropped afterwards."""
    name = f"dagster_test_{uuid.uuid4().hex[:10]}"
    with admin_connection() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield name
    with admin_connection() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Production:
    env: dict[str, str]  # what a deployment sets (DAGSTER_HOME, DAGSTER_PG_*, ML_LIFECYCLE_*)
    spec_path: Path
    database: str
    outputs: dict[str, str]  # job -> CLI output
    returncodes: dict[str, int]


@pytest.fixture(scope="module")
def production(database: str, tmp_path_factory: pytest.TempPathFactory) -> Production:
    """The two runs, launched at once through the job CLI against the production profile."""
    root = tmp_path_factory.mktemp("production")
    dagster_home = root / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(PROFILE, dagster_home / "dagster.yaml")
    spec_path = write_dataset(root / "dataset", "binary")
    env = {
        "DAGSTER_HOME": str(dagster_home),
        "DAGSTER_PG_HOST": PG_HOST,
        "DAGSTER_PG_PORT": str(PG_PORT),
        "DAGSTER_PG_USER": "postgres",
        "DAGSTER_PG_PASSWORD": "",
        "DAGSTER_PG_DB": database,
        "ML_LIFECYCLE_DATASET": str(spec_path),
        "ML_LIFECYCLE_HOME": str(root / "home"),
        # The registry on its own root URL, as on a shared filesystem mounted by every machine.
        "ML_LIFECYCLE_REGISTRY_URL": (root / "shared" / "registry").as_uri(),
    }
    base = {k: v for k, v in os.environ.items() if k not in (SCHEDULER_ENV, EXECUTOR_ENV)}
    # Create the instance's tables once, as a deployment does before starting its processes:
    # two processes creating them at the same moment on an empty database race
    # (DuplicateObject "run_tags").
    subprocess.run([str(DAGSTER), "instance", "migrate"], env={**base, **env}, cwd=root,
                   check=True, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    processes = {
        job: subprocess.Popen(
            [str(DAGSTER), "job", "execute", "-m", "ml_lifecycle.definitions", "-j", job],
            env={**base, **env, EXECUTOR_ENV: executor}, cwd=root,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for job, executor in RUNS.items()
    }
    outputs, returncodes = {}, {}
    for job, process in processes.items():
        try:
            outputs[job] = process.communicate(timeout=RUN_TIMEOUT)[0]
        except subprocess.TimeoutExpired:
            for other in processes.values():  # the CLI and its step processes
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(other.pid, signal.SIGKILL)
            raise
        returncodes[job] = process.returncode
    return Production(env, spec_path, database, outputs, returncodes)


@pytest.fixture
def instance(production: Production, monkeypatch: pytest.MonkeyPatch
             ) -> Iterator[dg.DagsterInstance]:
    """The deployment's instance, as `dagster` itself loads it (DagsterInstance.get())."""
    for key, value in production.env.items():
        monkeypatch.setenv(key, value)
    with dg.DagsterInstance.get() as instance:
        yield instance


def test_two_concurrent_runs_both_succeed(production: Production, instance: dg.DagsterInstance):
    for job in RUNS:
        assert production.returncodes[job] == 0, production.outputs[job][-3000:]
    assert isinstance(instance.run_storage, PostgresRunStorage)
    assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
    runs = {r.dagster_run.job_name: r.dagster_run for r in instance.get_run_records()}
    assert {job: run.status for job, run in runs.items()} == {
        job: dg.DagsterRunStatus.SUCCESS for job in RUNS}

    # They overlapped in time, yet no two warehouse steps (pool "duckdb", limit 1 in the profile)
    # ever ran at once, across the two processes.
    defs = build_definitions(load_spec(production.spec_path))
    intervals = []
    for job, run in runs.items():
        pooled = {name for name, node in defs.resolve_job_def(job).graph.node_dict.items()
                  if node.definition.pool == "duckdb"}
        started: dict[str, float] = {}
        for entry in instance.all_logs(run.run_id):
            if entry.step_key in pooled and entry.is_dagster_event:
                if entry.dagster_event_type == dg.DagsterEventType.STEP_START:
                    started[entry.step_key] = entry.timestamp
                elif entry.dagster_event_type == dg.DagsterEventType.STEP_SUCCESS:
                    intervals.append((started.pop(entry.step_key), entry.timestamp,
                                      f"{job}:{entry.step_key}"))
    assert {label.split(":")[0] for *_, label in intervals} == set(RUNS)
    intervals.sort()
    for (_, end, first), (start, _, second) in itertools.pairwise(intervals):
        assert end <= start, f"{first} and {second} held the warehouse at the same time"
    run_windows = [(instance.get_run_stats(r.run_id).start_time,
                    instance.get_run_stats(r.run_id).end_time) for r in runs.values()]
    assert max(s for s, _ in run_windows) < min(e for _, e in run_windows)


def test_runs_and_events_are_rows_in_postgres(production: Production):
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user="postgres",
                         dbname=production.database) as conn:
        runs = dict(conn.execute("SELECT pipeline_name, status FROM runs").fetchall())
        events = dict(conn.execute(
            "SELECT r.pipeline_name, count(*) FROM event_logs e JOIN runs r USING (run_id) "
            "GROUP BY r.pipeline_name").fetchall())
        materialized = {row[0] for row in conn.execute(
            "SELECT asset_key FROM event_logs "
            "WHERE dagster_event_type = 'ASSET_MATERIALIZATION'").fetchall()}
    assert runs == {job: "SUCCESS" for job in RUNS}
    assert all(events[job] > 10 for job in RUNS)
    assert '["model"]' in materialized and '["champion"]' in materialized


def test_automation_evaluates_on_the_postgres_instance(production: Production,
                                                       instance: dg.DagsterInstance):
    defs = build_definitions(load_spec(production.spec_path))
    unchanged = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert unchanged.get_num_requested(dg.AssetKey("model")) == 0

    params = production.spec_path.with_name("spec.params.yaml")
    params.write_text(params.read_text().replace("num_leaves: 15", "num_leaves: 7"))
    changed = build_definitions(load_spec(production.spec_path))
    result = dg.evaluate_automation_conditions(defs=changed, instance=instance,
                                               cursor=unchanged.cursor)
    assert result.get_num_requested(dg.AssetKey("model")) == 1


def test_the_registry_lives_under_its_root_url(production: Production):
    """The champion the training run promoted is under ML_LIFECYCLE_REGISTRY_URL/<dataset>,
    and nothing was written to the home's default registry folder."""
    from ml_lifecycle.training.registry import ModelRegistry

    spec = load_spec(production.spec_path)
    shared = Path(production.env["ML_LIFECYCLE_REGISTRY_URL"].removeprefix("file://")) / spec.name
    registry = ModelRegistry(shared)
    champion = registry.alias("champion")
    assert champion is not None and (shared / "versions" / champion).is_dir()
    assert not (Path(production.env["ML_LIFECYCLE_HOME"]) / spec.name / "registry").exists()
