"""Where the work runs: the training cluster resource and the Dagster executor of the jobs.

`TrainingCluster` trains in this process unless it names a Dask scheduler
(`ML_LIFECYCLE_DASK_SCHEDULER`, e.g. `tcp://scheduler:8786`); then `model` trains there
(training/distributed.py). `ML_LIFECYCLE_EXECUTOR` picks the executor: `in_process` (default,
one process, the embedded profile) or `multiprocess` (a process per step, the production profile).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import dagster as dg

from ml_lifecycle.training.dataset import ModelData
from ml_lifecycle.training.params import TrainingParams
from ml_lifecycle.training.trainer import TrainedModel, train

SCHEDULER_ENV = "ML_LIFECYCLE_DASK_SCHEDULER"
EXECUTOR_ENV = "ML_LIFECYCLE_EXECUTOR"
# Step processes fork from a server that has imported the code location once (`-m` target),
# instead of each spawning a fresh interpreter that imports dagster, DuckDB, LightGBM, ... again.
EXECUTORS = {
    "in_process": dg.in_process_executor,
    "multiprocess": dg.multiprocess_executor.configured(
        {"start_method": {"forkserver": {}}}, name="multiprocess_executor"),
}
CONNECT_TIMEOUT = "30s"


class TrainingCluster(dg.ConfigurableResource):
    """The Dask cluster `model` trains on; an empty address trains in the step's own process."""

    scheduler_address: str = ""

    @classmethod
    def from_env(cls) -> TrainingCluster:
        """The address from `ML_LIFECYCLE_DASK_SCHEDULER` (shown as an env var in the UI)."""
        if os.environ.get(SCHEDULER_ENV):
            return cls(scheduler_address=dg.EnvVar(SCHEDULER_ENV))
        return cls()

    def train(self, task: str, data: ModelData, params: TrainingParams,
              log: Callable[[str], None] = print) -> TrainedModel:
        if not self.scheduler_address:
            return train(task, data, params, log=log)
        # Imported here: the in-process path never loads dask.
        from distributed import Client

        from ml_lifecycle.training.distributed import train_distributed

        try:
            client = Client(self.scheduler_address, set_as_default=False,
                            timeout=CONNECT_TIMEOUT)
        except OSError as error:
            raise RuntimeError(
                f"cannot reach the Dask scheduler {self.scheduler_address!r} (resource `cluster`, "
                f"{SCHEDULER_ENV}) within {CONNECT_TIMEOUT}: {error}") from error
        with client:
            return train_distributed(client, task, data, params, log=log)


def executor_from_env() -> dg.ExecutorDefinition:
    """The executor named by `ML_LIFECYCLE_EXECUTOR` (default `in_process`)."""
    name = os.environ.get(EXECUTOR_ENV) or "in_process"
    if name not in EXECUTORS:
        raise ValueError(f"{EXECUTOR_ENV}={name!r}: expected one of {', '.join(EXECUTORS)}")
    return EXECUTORS[name]
