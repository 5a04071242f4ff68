"""Scaling sweeps out: the launcher presets in `conf/hydra/launcher/` (SLURM through
submitit, Ray), sweeps whose jobs run in processes started by submitit or by Ray, and
MLflow's tracking server on PostgreSQL. Every sweep runs as a user would type it and is
read back with MLflow's own client: one parent run, one FINISHED child per job, nested
under that parent.

One Optuna study is shared by three commands started independently, with the journal
file (a shared filesystem, no server) and with PostgreSQL as its storage: they run
exactly `n_trials` trials between them, under one MLflow parent run. Our sweeper runs
its trials through `submitit_local` and `ray_local` (grid sweeps use the same launchers
through Hydra's own sweeper, which `tests/test_sweeps.py` runs with the basic and joblib
launchers).

SLURM itself is not here (no `sbatch` on this machine): its preset is composed and its
launcher built, and `hydra/launcher=submitit_local` runs the same launcher code with
local processes instead of array tasks.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import psycopg2
import pytest
from conftest import REPO, SWEEP_JOB, run_module, sweep_runs
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from mlflow_server import MlflowServer, PostgresCluster, postgres, postgres_mlflow_server  # noqa: F401  (fixtures)

from pipeline.tracking.optuna_study import counts_toward_n_trials
from pipeline.tracking.optuna_trial import storage_for

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


# -- one Optuna study across processes and launchers ------------------------------------


def independent_workers(tmp_path: Path, tfds_dir: str, storage: str, workers: int = 3, n_trials: int = 3,
                        log_model: bool = False) -> list[subprocess.CompletedProcess]:
    """`workers` copies of one search command started at once, each in a directory of
    its own (as on machines of their own), sharing only the Optuna storage and the MLflow
    store; their outputs once all have ended."""
    command = [sys.executable, "-m", "pipeline.train", "hparams_search=optuna", *SWEEP_JOB,
               f"mlflow.log_model={str(log_model).lower()}",
               f"dataset.data_dir={tfds_dir}", f"hydra.sweeper.storage={storage}",
               f"hydra.sweeper.n_trials={n_trials}", "hydra.sweeper.pruner=none",
               # A worker with no trial left to ask polls for the others' end every second, not 5.
               "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=10",
               f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"TF_CPP_MIN_LOG_LEVEL": "2"}
    processes = []
    for number in range(workers):
        (tmp_path / f"host{number}").mkdir()
        processes.append(subprocess.Popen(command, cwd=tmp_path / f"host{number}", env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in processes]
    return [subprocess.CompletedProcess(p.args, p.returncode, *output) for p, output in zip(processes, outputs)]


def assert_one_study_one_parent(results: list[subprocess.CompletedProcess], storage, tmp_path: Path,
                                n_trials: int = 3) -> None:
    assert [r.returncode for r in results] == [0] * len(results), "\n".join(r.stderr[-2000:] for r in results)
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    counted = [t.number for t in trials if counts_toward_n_trials(t)]
    assert len(counted) == n_trials, [(t.number, t.state.name, t.user_attrs) for t in trials]
    lines = [line for r in results for line in r.stdout.splitlines() if re.match(rf"\[\d+/{n_trials}\] trial ", line)]
    assert len(lines) == n_trials, "each trial's line, printed by the worker that ran it"

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, children = sweep_runs(client)  # exactly one parent: the study's
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["optuna.study_name"] == summary.study_name
    finished = sorted(int(c.data.tags["optuna.trial_number"]) for c in children if c.info.status == "FINISHED")
    assert finished == sorted(counted), "every counted trial is a FINISHED child of the one parent"
    assert parent.data.tags["sweep.stopped"] == f"n_trials: the study holds {n_trials} finished trials " \
                                                f"(n_trials={n_trials})"


@pytest.mark.slow
def test_three_independent_commands_share_one_study_in_a_journal_file(tfds_dir: str, tmp_path: Path) -> None:
    # A cluster with a shared filesystem and no database server: the journal file on it.
    journal = tmp_path / "shared" / "study.log"
    journal.parent.mkdir()
    results = independent_workers(tmp_path, tfds_dir, f"journal://{journal}", log_model=True)
    assert_one_study_one_parent(results, storage_for(f"journal://{journal}"), tmp_path)
    # All three end together and summarise the same children; one registers the best.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, _ = sweep_runs(client)
    versions = client.search_model_versions("name='digits-mlp'")
    assert [v.run_id for v in versions] == [parent.data.tags["sweep.best_run_id"]], [
        (v.version, v.run_id) for v in versions]
    assert parent.data.tags["sweep.best_model"] == "models:/digits-mlp@sweep-best"


@pytest.mark.slow
def test_three_independent_commands_share_one_study_in_postgresql(postgres: PostgresCluster,  # noqa: F811
                                                                   tfds_dir: str, tmp_path: Path) -> None:
    # A database of its own: MLflow's (the server tests') keeps its own alembic_version table.
    postgres.run("createdb", "-h", "127.0.0.1", "-p", str(postgres.port), "-U", "mlflow", "optuna")
    url = f"postgresql+psycopg2://mlflow@127.0.0.1:{postgres.port}/optuna"
    results = independent_workers(tmp_path, tfds_dir, url)
    assert_one_study_one_parent(results, url, tmp_path)
    with psycopg2.connect(host="127.0.0.1", port=postgres.port, user="mlflow", dbname="optuna") as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT state, count(*) FROM trials GROUP BY state")
            assert dict(cursor.fetchall())["COMPLETE"] == 3, "the trials are PostgreSQL's rows"
    connection.close()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["submitit_local", "ray_local"])
def test_an_optuna_search_runs_its_trials_through_another_launcher(launcher: str, tfds_dir: str,
                                                                   tmp_path: Path) -> None:
    # Trials in processes the launcher starts, two at a time (so later batches are sampled
    # from the first's results), reporting their epochs to the study (what pruning reads)
    # through the storage, each a FINISHED child of the sweep's one parent run.
    result = run_module("pipeline.train", "hparams_search=optuna", f"hydra/launcher={launcher}", *SWEEP_JOB,
                        "mlflow.log_model=false", "hydra.sweeper.n_trials=4",
                        "hydra.sweeper.n_jobs=2", f"dataset.data_dir={tfds_dir}", cwd=tmp_path,
                        # Ray would otherwise try to report usage statistics over the network.
                        env={"RAY_USAGE_STATS_ENABLED": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert all(len(t.intermediate_values) == 1 for t in trials), "the epoch reported from the launcher's process"
    parent, children = sweep_runs(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["sweep.launcher"] == {"submitit_local": "LocalLauncher", "ray_local": "RayLauncher"}[
        launcher], "hydra-submitit-launcher's local executor (SLURM's launcher code), or Ray's"
    assert sorted(int(c.data.tags["optuna.trial_number"]) for c in children) == [0, 1, 2, 3]
    assert [c.info.status for c in children] == ["FINISHED"] * 4, [c.data.tags.get("failure_reason")
                                                                    for c in children]
    assert all(math.isfinite(c.data.metrics["final_val_accuracy"]) for c in children)
    assert parent.data.tags["sweep.best_run_id"] in {c.info.run_id for c in children}
    if launcher == "submitit_local":  # each trial ran in a process submitit started, and left its result there
        assert len(submitit_results(Path(parent.data.tags["sweep.dir"]))) == 4
