"""Sweeps (`python -m pipeline.train -m ...`): one MLflow parent run per sweep, a nested
child per job, failures recorded without stopping the sweep, a summary on the parent;
Optuna searches; the joblib launcher against a real tracking server; experiment presets
and debug modes. Every sweep runs as a user would type it, into a real store read back
with MLflow's own client."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import REPO, SWEEP_JOB, compose_config, compose_plan, new_mlflow_store, run_module, sweep_runs
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from pipeline.config import validate
from pipeline.tracking import sweep, sweep_summary

TINY = SWEEP_JOB  # every job of these sweeps trains one epoch, silently, on the session's digits


def summary_table(client: MlflowClient, parent) -> dict[str, list]:
    """`sweep_summary.json` as column -> values."""
    path = client.download_artifacts(parent.info.run_id, "sweep_summary.json")
    table = json.loads(Path(path).read_text())
    return {column: [row[i] for row in table["data"]] for i, column in enumerate(table["columns"])}


# -- configs and pieces, no training ----------------------------------------------------


@pytest.mark.parametrize("override", [
    *(f"experiment={p.stem}" for p in sorted((REPO / "conf" / "experiment").glob("*.yaml"))),
    *(f"debug={p.stem}" for p in sorted((REPO / "conf" / "debug").glob("*.yaml"))),
    "experiment=resnet_digits_mixed debug=smoke",
])
def test_presets_and_debug_modes_compose_and_validate(override: str) -> None:
    cfg = compose_config(override.split())
    validate(cfg)
    if override.startswith("debug="):
        assert cfg.debug.mode == override.split()[0].removeprefix("debug=")
        assert cfg.mlflow.log_model is False, "a debug run registers nothing"
    if "experiment=resnet_digits_mixed" in override:
        assert cfg.architecture._target_ == "architectures.resnet.build"
        assert cfg.precision.policy == "mixed"
    if override.endswith("debug=smoke"):
        assert cfg.trainer.epochs == 1, "debug comes after the preset, so it shrinks it"


def test_optuna_search_space_composes() -> None:
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.optimized_metric == "final_val_accuracy"
    assert set(cfg.hydra.sweeper.params) == {"optimizer.lr", "architecture.dropout"}
    assert cfg.hydra.callbacks.sweep._target_ == "pipeline.sweep_callback.SweepCallback"


def test_debug_modes_shrink_every_split(tfds_dir: str) -> None:
    import tensorflow as tf

    from pipeline import data
    from pipeline.training import debug

    expected = {  # mode -> (steps per epoch, val batches, test batches); digits: 41/5/12 batches of 32
        "smoke": (3, 3, 3),
        "limit": (5, 1, 2),
        "overfit": (10, 1, 12),
    }
    for mode, (steps, val_batches, test_batches) in expected.items():
        cfg = compose_config([f"debug={mode}", f"dataset.data_dir={tfds_dir}"])
        splits = debug.apply(cfg, data.load(cfg.dataset, seed=0))
        epoch = splits.epoch_batches(tf.constant(0, tf.int64))
        assert splits.steps_per_epoch == steps == int(epoch.cardinality()) == len(list(epoch))
        # `train` runs on into the next epochs, each as long.
        assert splits.train.cardinality() == tf.data.INFINITE_CARDINALITY
        assert len(list(splits.train.take(3 * steps))) == 3 * steps
        assert len(list(splits.val)) == val_batches and len(list(splits.test)) == test_batches
        assert debug.tags(cfg) == {"debug": mode}
    first = [x.numpy() for x, _ in splits.train.take(25)]  # overfit: one batch, the same every step
    assert all((x == first[0]).all() for x in first) and splits.sizes["train"] == 32


def test_summary_picks_the_best_finished_child_and_lists_failures() -> None:
    rows = [
        {"job": 0, "run_name": "optimizer.lr=0.1", "run_id": "a", "status": "FINISHED", "failure_reason": "",
         "param optimizer.lr": "0.1", "final_val_loss": 0.5},
        {"job": 1, "run_name": "optimizer.lr=0.001", "run_id": "b", "status": "FINISHED", "failure_reason": "",
         "param optimizer.lr": "0.001", "final_val_loss": 0.2},
        {"job": 2, "run_name": "optimizer.lr=1e12", "run_id": "c", "status": "FAILED",
         "failure_reason": "DivergenceError: non-finite loss", "param optimizer.lr": "1e12"},
    ]
    summary = sweep_summary.Summary(rows, ["optimizer.lr"], "final_val_loss", "minimize")
    assert summary.best["run_id"] == "b"
    assert [row["run_id"] for row in summary.failed] == ["c"]
    assert summary.headline().startswith("3 jobs, 2 finished, 1 failed; best: optimizer.lr=0.001")
    assert "| 2 | optimizer.lr=1e12 | FAILED |  | DivergenceError: non-finite loss |" in summary.markdown()
    assert summary.table()["final_val_loss"] == [0.5, 0.2, None]
    assert sweep_summary.Summary(rows, [], "final_val_loss", "maximize").best["run_id"] == "a"

    figure = sweep_summary.metric_vs_params(rows + [{**rows[0], "param architecture": "mlp"}], "final_val_loss",
                                    ["optimizer.lr", "architecture"])
    assert isinstance(figure, Figure)
    lr_axes, architecture_axes = figure.axes
    assert lr_axes.get_xscale() == "log", "0.001 to 0.1 spans 100x"
    assert len(lr_axes.collections[0].get_offsets()) == 3, "the failed child is not plotted"
    assert [t.get_text() for t in architecture_axes.get_xticklabels()] == ["mlp"]
    assert "1 failed" in figure.texts[0].get_text()


def test_swept_keys_come_from_sweep_overrides_and_the_search_space() -> None:
    overrides = ["architecture=mlp,resnet", "trainer.epochs=1", "+x=glob(*)", "optimizer.lr=interval(0.1,1)"]
    assert sweep.swept_keys(overrides, {"architecture.dropout": "interval(0,0.5)"}) == [
        "architecture", "x", "optimizer.lr", "architecture.dropout"]


# -- sweeps on the command line ---------------------------------------------------------


@pytest.mark.slow
def test_grid_with_basic_launcher(tfds_dir: str, tmp_path: Path, empty_mlflow_db: Path) -> None:
    new_mlflow_store(tmp_path, empty_mlflow_db)
    result = run_module("pipeline.train", "-m", "architecture=mlp,functional", "optimizer.lr=1e-3,1e-2", *TINY,
                        f"dataset.data_dir={tfds_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, children = sweep_runs(client)
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "sweep architecture=mlp,functional optimizer.lr=1e-3,1e-2"
    assert Path(parent.data.tags["sweep.dir"]).is_dir()
    assert parent.data.tags["sweep.overrides"].startswith("architecture=mlp,functional optimizer.lr=1e-3,1e-2 ")
    assert [c.info.run_name for c in children] == [
        "architecture=mlp optimizer.lr=0.001", "architecture=mlp optimizer.lr=0.01",
        "architecture=functional optimizer.lr=0.001", "architecture=functional optimizer.lr=0.01"]
    assert [c.info.status for c in children] == ["FINISHED"] * 4, "one process, four jobs, none left RUNNING"
    assert [c.data.tags["architecture"] for c in children] == ["mlp", "mlp", "functional", "functional"]
    assert [c.data.params["optimizer.lr"] for c in children] == ["0.001", "0.01"] * 2

    # The summary: a table row per child, a plot, the best child by the optimized metric.
    table = summary_table(client, parent)
    assert table["run_id"] == [c.info.run_id for c in children]
    assert table["status"] == ["FINISHED"] * 4
    assert table["param optimizer.lr"] == ["0.001", "0.01"] * 2
    assert table["final_val_accuracy"] == pytest.approx([c.data.metrics["final_val_accuracy"] for c in children])
    assert "sweep_metric_vs_params.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    best = max(children, key=lambda c: c.data.metrics["final_val_accuracy"])
    assert parent.data.tags["sweep.best_run_id"] == best.info.run_id
    assert parent.data.metrics["best_final_val_accuracy"] == best.data.metrics["final_val_accuracy"]
    assert (parent.data.tags["sweep.jobs"], parent.data.tags["sweep.failed"]) == ("4", "0")
    assert parent.data.tags["mlflow.note.content"].startswith("**Sweep**: 4 jobs, 4 finished, 0 failed")

    # Every child logged its model; only the best child's became a registered version (the
    # sweep's one candidate for @champion), with @sweep-best and a model card naming the sweep.
    assert all(client.get_run(c.info.run_id).outputs.model_outputs for c in children)
    versions = [v for m in client.search_registered_models() for v in client.search_model_versions(f"name='{m.name}'")]
    assert [(v.run_id, str(v.version)) for v in versions] == [(best.info.run_id, "1")]
    (version,) = versions
    assert client.get_registered_model(version.name).aliases == {"champion": 1, "sweep-best": 1}
    assert f"Sweep: [{parent.info.run_name}](#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id})" \
        in version.description
    assert best.data.tags["registered_model"] == f"{version.name}/1"
    assert table["registered_model"] == [f"{version.name}/1" if c is best else "" for c in children]


@pytest.mark.slow
def test_failed_jobs_leave_failed_children_and_a_nonzero_exit(tfds_dir: str, tmp_path: Path,
                                                              empty_mlflow_db: Path) -> None:
    new_mlflow_store(tmp_path, empty_mlflow_db)
    # 1e12 diverges in training; -1 is refused by validation before any run opens.
    result = run_module("pipeline.train", "-m", "optimizer=sgd", "optimizer.lr=0.01,1e12,-1", *TINY,
                        f"dataset.data_dir={tfds_dir}", cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors[-1].startswith("error: 2 of 3 sweep jobs failed; parent run ")

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, (finished, diverged, refused) = sweep_runs(client)
    assert [c.info.run_name for c in (finished, diverged, refused)] == [
        "optimizer.lr=0.01", "optimizer.lr=1000000000000.0", "optimizer.lr=-1"]
    assert finished.info.status == "FINISHED"
    assert diverged.info.status == "FAILED"
    assert re.fullmatch(r"DivergenceError: non-finite \w+ in layer '\w+' at step \d+ \(epoch 0\)",
                        diverged.data.tags["failure_reason"]), diverged.data.tags["failure_reason"]
    assert refused.info.status == "FAILED"
    assert refused.data.tags["failure_reason"] == "ConfigError: optimizer.lr must be > 0. Received: -1.0"
    assert "train.log" in {a.path for a in client.list_artifacts(refused.info.run_id)}

    assert parent.info.status == "FINISHED", "the sweep itself ran to its end"
    assert parent.data.tags["sweep.failed"] == "2"
    assert parent.data.tags["sweep.failures"].startswith("optimizer.lr=1000000000000.0: DivergenceError: ")
    assert "optimizer.lr=-1: ConfigError: " in parent.data.tags["sweep.failures"]
    assert summary_table(client, parent)["status"] == ["FINISHED", "FAILED", "FAILED"]
    # The one finished child is the best, and its registered version gets @sweep-best.
    assert parent.data.tags["sweep.best_run_id"] == finished.info.run_id
    name, version = finished.data.tags["registered_model"].split("/")
    assert str(client.get_model_version_by_alias(name, "sweep-best").version) == version


@pytest.mark.slow
def test_optuna_search_records_diverged_trials_as_failed(tfds_dir: str, tmp_path: Path,
                                                        empty_mlflow_db: Path) -> None:
    new_mlflow_store(tmp_path, empty_mlflow_db)
    # Sampler seed 42 draws lr ~98, ~5e7 and ~0.03 from this range: two trials diverge.
    result = run_module("pipeline.train", "hparams_search=optuna", "hydra.sweeper.n_trials=3", "optimizer=sgd",
                        "optimizer.lr=tag(log,interval(1e-4,1e12))", *TINY, f"dataset.data_dir={tfds_dir}",
                        "mlflow.log_model=false", cwd=tmp_path)
    assert result.returncode == 0, "diverged trials are failed trials, not a failed search:\n" + result.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, children = sweep_runs(client)
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.sweeper"] == "OptunaSweeper"
    assert len(children) == 3
    assert all(re.fullmatch(r"optimizer\.lr=\S+ architecture\.dropout=\S+", c.info.run_name) for c in children)
    finished = [c for c in children if c.info.status == "FINISHED"]
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(finished) == 1 and len(failed) == 2
    assert all(c.data.tags["failure_reason"].startswith("DivergenceError: ") for c in failed)

    # What Optuna optimized is what the child logged: the optimized metric of the one good trial.
    (sweep_dir,) = (tmp_path / "multirun").glob("*/*")
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(finished[0].data.metrics["final_val_accuracy"])
    assert parent.data.tags["sweep.best_run_id"] == finished[0].info.run_id


@pytest.mark.slow
def test_joblib_launcher_in_parallel_against_a_tracking_server(mlflow_server: str, tfds_dir: str,
                                                              tmp_path: Path) -> None:
    # Its own experiment and no registration: the session's server is shared with other tests.
    result = run_module("pipeline.train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "mlflow=server",
                        "mlflow.experiment_name=joblib_sweep", "mlflow.log_model=false",
                        "architecture=mlp,functional", "optimizer.lr=1e-3,1e-2", *TINY,
                        f"dataset.data_dir={tfds_dir}", cwd=tmp_path, env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parallel against the sqlite store" not in result.stdout + result.stderr

    client = MlflowClient(mlflow_server)
    parent, children = sweep_runs(client, "joblib_sweep")
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.launcher"] == "JoblibLauncher"
    assert [c.info.status for c in children] == ["FINISHED"] * 4
    assert sorted(c.info.run_name for c in children) == sorted(
        f"architecture={a} optimizer.lr={lr}" for a in ("mlp", "functional") for lr in ("0.001", "0.01"))
    assert parent.data.tags["sweep.best_run_id"] in {c.info.run_id for c in children}


@pytest.mark.slow
def test_every_experiment_preset_in_smoke_mode(tfds_dir: str, tmp_path: Path, empty_mlflow_db: Path) -> None:
    new_mlflow_store(tmp_path, empty_mlflow_db)
    # CIFAR-10's preset needs the dataset prepared where there is network: offline, it is
    # left out (test_the_cifar10_recipe_trains_on_digits runs its recipe on digits).
    result = run_module("pipeline.train", "-m", "experiment=glob(*,exclude=cifar10_*)", "debug=smoke",
                        f"dataset.data_dir={tfds_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent, children = sweep_runs(client)
    presets = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml") if not p.stem.startswith("cifar10_"))
    assert [c.info.run_name for c in children] == [f"experiment={p}" for p in presets]
    assert all(c.info.status == "FINISHED" and c.data.tags["debug"] == "smoke" for c in children)
    assert {c.data.tags["architecture"] for c in children} == {"attention", "resnet"}
    assert all(c.data.params["data.train_examples"] == "96" for c in children), "3 batches of 32"
    assert client.search_registered_models() == [], "debug runs register nothing"


def test_the_cifar10_recipe_trains_on_digits(tfds_dir: str, mlflow_store: str) -> None:
    """experiment=cifar10_resnet's recipe (resnet, flip and crop, SGD on a cosine schedule)
    with the offline digits in place of CIFAR-10, in smoke mode."""
    from pipeline.train import train

    plan = compose_plan(["experiment=cifar10_resnet", "dataset=digits", f"dataset.data_dir={tfds_dir}",
                         "augment.pad=1", "debug=smoke", "trainer.verbose=0"])
    assert (plan.cfg.augment._target_, plan.cfg.optimizer.schedule) == ("pipeline.augment.FlipCrop", "cosine")
    assert math.isfinite(train(plan)["final_val_loss"])
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("digits").experiment_id])
    assert run.data.params["augment.flip"] == "True" and run.data.params["optimizer._target_"] == "keras.optimizers.SGD"
    assert run.data.tags["architecture"] == "resnet"


@pytest.mark.slow
def test_overfit_mode_drives_the_loss_to_zero(tfds_dir: str, mlflow_store: str) -> None:
    from pipeline.train import train

    metrics = train(compose_plan(["debug=overfit", f"dataset.data_dir={tfds_dir}", "trainer.verbose=0"]))
    assert metrics["train_loss"] < 0.01 and metrics["final_val_accuracy"] == 1.0, metrics

    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("digits").experiment_id])
    assert run.data.tags["debug"] == "overfit"
    epochs = len(MlflowClient().get_metric_history(run.info.run_id, "train_loss"))
    assert epochs < 50, "StopAtLoss ended training once the batch was memorised"
    assert run.data.params["data.train_examples"] == "32" and "registered_model" not in run.data.tags
    assert math.isfinite(metrics["test_accuracy"])
