"""Scaling sweeps out: the launcher presets in `conf/hydra/launcher/` (SLURM through
submitit, Ray), sweeps whose jobs run in processes started by submitit or by Ray, and
MLflow's tracking server on PostgreSQL. Every sweep runs as a user would type it,
against a real `mlflow server`, and is read back with MLflow's own client: one parent
run, one FINISHED child per job, nested under that parent.

SLURM itself is not here (no `sbatch` on this machine): its preset is composed and its
launcher built, and `hydra/launcher=submitit_local` runs the same launcher code with
local processes instead of array tasks.
"""

from __future__ import annotations

import math
from pathlib import Path

import psycopg2
import pytest
from conftest import REPO, SWEEP_JOB, run_module, sweep_runs
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from mlflow_server import MlflowServer, PostgresCluster, postgres, postgres_mlflow_server  # noqa: F401  (fixtures)

LAUNCHER_PRESETS = sorted((REPO / "conf" / "hydra" / "launcher").glob("*.yaml"))


def compose_with_hydra(overrides: list[str]):
    """The real `conf/train.yaml` with its `hydra` node, as `python -m pipeline.train` composes it."""
    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def submitit_results(sweep_dir: Path) -> list[Path]:
    """The result pickle each submitit job leaves in its own folder of `sweep_dir/.submitit/`."""
    return sorted((sweep_dir / ".submitit").glob("*/*_result.pkl"))


# -- presets, no jobs -------------------------------------------------------------------


def test_launcher_presets_exist() -> None:
    assert {p.stem for p in LAUNCHER_PRESETS} >= {"slurm", "ray_local"}, [p.name for p in LAUNCHER_PRESETS]


@pytest.mark.parametrize("preset", [p.stem for p in LAUNCHER_PRESETS])
def test_launcher_preset_composes_and_builds_its_launcher(preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    cfg = compose_with_hydra([f"hydra/launcher={preset}", "mlflow=server"])
    assert cfg.hydra.runtime.choices["hydra/launcher"] == preset
    launcher = instantiate(cfg.hydra.launcher)  # what Hydra does at the start of a sweep; submits nothing
    expected = {"slurm": "SlurmLauncher", "ray_local": "RayLauncher"}.get(preset)
    if expected:
        assert type(launcher).__name__ == expected, f"{preset} extends the plugin's own schema"


def test_slurm_preset_exports_the_tracking_uri_to_every_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    cfg = compose_with_hydra(["hydra/launcher=slurm", "mlflow=server", "hydra.launcher.partition=cpu"])
    params = instantiate(cfg.hydra.launcher).params  # resolved, as submitit receives them
    assert params["setup"][0] == "export MLFLOW_TRACKING_URI=http://mlflow.internal:5000", params["setup"]
    assert params["partition"] == "cpu"
    assert (params["timeout_min"], params["cpus_per_task"], params["mem_gb"], params["array_parallelism"]) == (
        60, 4, 8, 16)
    assert params["submitit_folder"].endswith("/.submitit/%j"), "job pickles and logs live in the sweep dir"


# -- sweeps in other processes ----------------------------------------------------------


@pytest.mark.slow
def test_submitit_local_jobs_are_children_of_one_parent(mlflow_server: str, tfds_dir: str, tmp_path: Path) -> None:
    # Its own experiment and no registration: the session's server is shared with other tests.
    result = run_module("pipeline.train", "-m", "hydra/launcher=submitit_local", "mlflow=server",
                        "mlflow.experiment_name=submitit_sweep", "mlflow.log_model=false", "optimizer.lr=1e-3,1e-2",
                        *SWEEP_JOB, f"dataset.data_dir={tfds_dir}", cwd=tmp_path,
                        env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(mlflow_server)
    parent, children = sweep_runs(client, "submitit_sweep")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.launcher"] == "LocalLauncher", "hydra-submitit-launcher's local executor"
    assert [c.info.run_name for c in children] == ["optimizer.lr=0.001", "optimizer.lr=0.01"]
    assert [c.info.status for c in children] == ["FINISHED"] * 2, [c.data.tags.get("failure_reason") for c in children]
    assert all(math.isfinite(c.data.metrics["final_val_accuracy"]) for c in children)
    assert parent.data.tags["sweep.best_run_id"] in {c.info.run_id for c in children}
    # Each job ran in a process submitit started, which left its result in its own folder.
    assert len(submitit_results(Path(parent.data.tags["sweep.dir"]))) == 2


@pytest.mark.slow
def test_ray_jobs_are_children_of_one_parent(mlflow_server: str, tfds_dir: str, tmp_path: Path) -> None:
    result = run_module("pipeline.train", "-m", "hydra/launcher=ray_local", "mlflow=server",
                        "mlflow.experiment_name=ray_sweep", "mlflow.log_model=false", "optimizer.lr=1e-3,1e-2",
                        *SWEEP_JOB, f"dataset.data_dir={tfds_dir}", cwd=tmp_path,
                        # Ray would otherwise try to report usage statistics over the network.
                        env={"MLFLOW_TRACKING_URI": mlflow_server, "RAY_USAGE_STATS_ENABLED": "0"})
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(mlflow_server)
    parent, children = sweep_runs(client, "ray_sweep")
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.launcher"] == "RayLauncher"
    assert [c.info.run_name for c in children] == ["optimizer.lr=0.001", "optimizer.lr=0.01"]
    assert [c.info.status for c in children] == ["FINISHED"] * 2, [c.data.tags.get("failure_reason") for c in children]
    assert parent.data.tags["sweep.best_run_id"] in {c.info.run_id for c in children}


# -- MLflow on PostgreSQL ---------------------------------------------------------------


@pytest.mark.slow
def test_parallel_sweep_into_mlflow_on_postgresql(postgres: PostgresCluster,  # noqa: F811
                                                  postgres_mlflow_server: MlflowServer,  # noqa: F811
                                                  tfds_dir: str, tmp_path: Path) -> None:
    url = postgres_mlflow_server.url
    assert postgres_mlflow_server.backend_store_uri.startswith("postgresql+psycopg2://")
    # register=all: every job registers a version, in parallel, against PostgreSQL (the default registers the best).
    result = run_module("pipeline.train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "mlflow=server",
                        "hydra.callbacks.sweep.register=all", "optimizer.lr=1e-3,3e-3,1e-2,3e-2", *SWEEP_JOB,
                        f"dataset.data_dir={tfds_dir}", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": url})
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(url)
    parent, children = sweep_runs(client)  # experiment `digits`: this server holds only this sweep
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.launcher"] == "JoblibLauncher"
    assert [c.info.run_name for c in children] == [f"optimizer.lr={lr}" for lr in ("0.001", "0.003", "0.01", "0.03")]
    assert [c.info.status for c in children] == ["FINISHED"] * 4, [c.data.tags.get("failure_reason") for c in children]

    versions = []
    for child in children:
        metrics = child.data.metrics
        for key in ("train_loss", "val_accuracy", "final_val_accuracy", "test_accuracy"):
            assert math.isfinite(metrics.get(key, math.nan)), f"{child.info.run_name}: {key} missing or not finite"
        assert len(client.get_metric_history(child.info.run_id, "val_accuracy")) == 1, "one epoch, logged once"
        name, _, version = child.data.tags["registered_model"].rpartition("/")
        model_version = client.get_model_version(name, version)
        assert model_version.run_id == child.info.run_id, f"{name}/{version} belongs to {child.info.run_name}"
        assert model_version.status == "READY"
        versions.append(version)
    assert (name, sorted(versions, key=int)) == ("digits-mlp", ["1", "2", "3", "4"]), "one version per job"
    best = client.get_model_version_by_alias("digits-mlp", "sweep-best")
    assert best.run_id == parent.data.tags["sweep.best_run_id"]

    # What the server answered is what PostgreSQL holds.
    with psycopg2.connect(host="127.0.0.1", port=postgres.port, user="mlflow", dbname="mlflow") as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT run_uuid, status FROM runs")
            stored = dict(cursor.fetchall())
            cursor.execute("SELECT count(*) FROM model_versions WHERE name = 'digits-mlp'")
            (stored_versions,) = cursor.fetchone()
    connection.close()
    assert stored == {run.info.run_id: "FINISHED" for run in (parent, *children)}
    assert stored_versions == 4
