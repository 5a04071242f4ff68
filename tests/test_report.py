"""pipeline.tracking.report on real models, real data pipelines and a real MLflow store: the PNGs
logged under plots/ and the `.keras` model logged for pipeline.inspect."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf
from conftest import DEFAULT_RUN_OVERRIDES, TrainedRun, compose_config
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from architectures import InputSpec, mlp, multi_io
from pipeline import data, notices
from pipeline.inspect import load_keras_model
from pipeline.tracking import report
from pipeline.training import optim

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GRAPHVIZ = importlib.util.find_spec("pydot") is not None and shutil.which("dot") is not None
SINGLE_OUTPUT_PLOTS = {"learning_curves.png", "confusion_matrix.png", "grad_norm.png", "learning_rate.png"} | (
    {"architecture.png"} if GRAPHVIZ else set())
REPORT = "classification_report.txt"  # beside the confusion matrix: per-class precision and recall, by name


@pytest.fixture(scope="module")
def trained(tfds_dir: str):
    """A small mlp trained 2 epochs on the real digits pipelines with the pipeline's own
    optimizer: a warmed-up cosine schedule wrapped in `ScaledLearningRate`."""
    cfg = compose_config([f"dataset.data_dir={tfds_dir}", "optimizer.schedule=cosine", "optimizer.warmup_epochs=1"])
    splits = data.load(cfg.dataset, seed=0)
    keras.utils.set_random_seed(0)
    model = mlp.build(splits.input_spec, hidden_units=[32])
    optimizer = optim.build(cfg.optimizer, splits.steps_per_epoch, 2, tf.Variable(1.0, trainable=False))
    assert isinstance(optimizer._learning_rate, optim.ScaledLearningRate)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(splits.train, steps_per_epoch=splits.steps_per_epoch, validation_data=splits.val, epochs=2,
                        verbose=0).history
    return model, optimizer, history, splits


def log_grad_norms(run_id: str, layers: list[str], steps: range) -> None:
    """`grad_norm` and `grad_norm/<layer>` per step, as callbacks.grad_norm logs them."""
    metrics = [Metric("grad_norm", 1.0 + step, 0, step) for step in steps]
    metrics += [Metric(f"grad_norm/{layer}", (index + 1) * 0.1 * (1 + step), 0, step)
                for index, layer in enumerate(layers) for step in steps]
    MlflowClient().log_batch(run_id, metrics=metrics)


def logged_pngs(run_id: str, tmp_path: Path) -> dict[str, bytes]:
    client = MlflowClient()
    local = Path(client.download_artifacts(run_id, "plots", str(tmp_path / "download")))
    return {path.name: path.read_bytes() for path in local.iterdir() if path.suffix == ".png"}


def test_single_output_run_gets_every_plot(trained, mlflow_store: str, tmp_path: Path) -> None:
    model, optimizer, history, splits = trained
    with mlflow.start_run(experiment_id=MlflowClient().create_experiment("report")) as run:
        log_grad_norms(run.info.run_id, ["dense", "dense_1"], range(0, 82, 10))
        logged = report.log_training_plots(history, model, optimizer, splits.steps_per_epoch * 2, splits.test,
                                           splits.input_spec, run.info.run_id, grad_norm_threshold=5.0)
    assert sorted(logged) == sorted(f"plots/{name}" for name in SINGLE_OUTPUT_PLOTS | {REPORT})
    pngs = logged_pngs(run.info.run_id, tmp_path)
    assert set(pngs) == SINGLE_OUTPUT_PLOTS
    for name, content in pngs.items():
        assert content[:8] == PNG_MAGIC and len(content) > 5000, name


def test_confusion_matrix_counts_the_models_test_predictions(trained) -> None:
    model, _, _, splits = trained
    made = report._confusion_matrices(model, splits.test, splits.input_spec, splits.class_names)
    assert set(made) == {"confusion_matrix.png", REPORT}
    accuracy = model.evaluate(splits.test, return_dict=True, verbose=0)["accuracy"]
    figure = made["confusion_matrix.png"]
    title = figure.axes[0].get_title()
    assert f"accuracy {accuracy:.4f} on {splits.sizes['test']} examples" in title, title
    assert [label.get_text() for label in figure.axes[0].get_xticklabels()] == list(splits.class_names)
    rows = made[REPORT].splitlines()
    assert rows[0].split() == ["class", "precision", "recall", "f1-score", "support"]
    assert [row.split()[0] for row in rows[1:-1]] == list(splits.class_names)
    assert rows[-1].split()[1] == f"{accuracy:.4f}" and int(rows[-1].split()[2]) == splits.sizes["test"]


def test_grad_norm_figure_reads_the_runs_metrics(mlflow_store: str) -> None:
    layers = [f"layer_{i:02d}" for i in range(15)]
    with mlflow.start_run(experiment_id=MlflowClient().create_experiment("norms")) as run:
        log_grad_norms(run.info.run_id, layers, range(0, 50, 10))
    figure = report._grad_norm_figure(MlflowClient(), run.info.run_id, threshold=2.5)
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    np.testing.assert_array_equal(lines["global"].get_xdata(), [0, 10, 20, 30, 40])
    np.testing.assert_allclose(lines["global"].get_ydata(), [1, 11, 21, 31, 41])
    # The 12 layers with the largest peak norm, not all 15: the legend stays readable.
    assert {label for label in lines if label.startswith("layer_")} == set(layers[3:])
    assert "threshold 2.5" in lines


def test_plots_skip_what_cannot_be_drawn_and_never_raise(trained, mlflow_store: str, caplog) -> None:
    model, optimizer, _, splits = trained
    with mlflow.start_run(experiment_id=MlflowClient().create_experiment("broken")) as run:
        with caplog.at_level(logging.WARNING, logger="pipeline.tracking.report"):
            # An empty history and zero steps are real failures of their plots; no
            # grad_norm metric in the run skips that plot without a warning.
            logged = report.log_training_plots({}, model, optimizer, 0, splits.test, splits.input_spec,
                                               run.info.run_id)
    assert sorted(logged) == sorted(["plots/confusion_matrix.png", f"plots/{REPORT}"]
                                    + (["plots/architecture.png"] if GRAPHVIZ else []))
    warnings = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("plot learning curves skipped: ValueError") for m in warnings), warnings
    assert any(m.startswith("plot learning rate skipped: ValueError: total_steps") for m in warnings), warnings
    assert not any("gradient norm" in m for m in warnings)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking.report"):
        assert report.log_training_plots({"loss": [1.0]}, model, optimizer, 10, splits.test, splits.input_spec,
                                         "0" * 32) == []
    assert any(m.startswith("plots not logged to run 00000") for m in caplog.messages), caplog.messages


def test_missing_graphviz_warns_on_the_stores_first_run_only(
        trained, mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    model, optimizer, history, splits = trained
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)  # no Graphviz `dot`
    said = []
    for run_name in ["first", "second"]:
        monkeypatch.setattr(notices, "_said", set())  # each run in a process of its own
        caplog.clear()
        with mlflow.start_run(run_name=run_name) as run, caplog.at_level(logging.INFO, logger="pipeline.figures"):
            logged = report.log_training_plots(history, model, optimizer, splits.steps_per_epoch * 2, splits.test,
                                               splits.input_spec, run.info.run_id)
        assert "plots/architecture.png" not in logged and "plots/learning_curves.png" in logged
        said += [(r.levelname, r.getMessage()) for r in caplog.records if "architecture diagrams" in r.getMessage()]
    missing = "architecture diagrams skipped: Graphviz's `dot` program (`apt-get install graphviz`) missing"
    assert said == [("WARNING", f"{missing} (said once per MLflow store)"), ("INFO", missing)]
    assert (tmp_path / ".mlflow.db.graphviz-missing").is_file(), "remembered beside the store"


def test_multi_output_model_gets_one_confusion_matrix_per_head(mlflow_store: str, tmp_path: Path) -> None:
    spec = InputSpec(shape=(16, 16, 1), dtype="uint8", num_classes=0, features=4,
                     heads=(("binary", 2), ("category", 5)))
    keras.utils.set_random_seed(0)
    model = multi_io.build(spec)
    rng = np.random.default_rng(0)
    inputs = {"image": rng.integers(0, 256, size=(40, 16, 16, 1), dtype=np.uint8),
              "features": rng.standard_normal((40, 4)).astype(np.float32)}
    labels = {"binary": rng.integers(0, 2, size=40), "category": rng.integers(0, 5, size=40)}
    test = tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(16)
    model.compile(optimizer="adam",
                  loss={"binary": "binary_crossentropy", "category": "sparse_categorical_crossentropy"},
                  metrics={"binary": ["accuracy"], "category": ["accuracy"]})
    history = model.fit(test, validation_data=test, epochs=2, verbose=0).history

    with mlflow.start_run(experiment_id=MlflowClient().create_experiment("multi")) as run:
        logged = report.log_training_plots(history, model, model.optimizer, 6, test, spec, run.info.run_id)
    expected = {"learning_curves.png", "confusion_matrix_binary.png", "confusion_matrix_category.png",
                "learning_rate.png"} | ({"architecture.png"} if GRAPHVIZ else set())
    reports = {"classification_report_binary.txt", "classification_report_category.txt"}
    assert {path.removeprefix("plots/") for path in logged} == expected | reports
    assert set(logged_pngs(run.info.run_id, tmp_path)) == expected

    figures = report._confusion_matrices(model, test, spec)
    predicted = model.predict(inputs, verbose=0)
    binary_accuracy = np.mean((predicted["binary"][:, 0] > 0.5) == labels["binary"])
    category_accuracy = np.mean(predicted["category"].argmax(1) == labels["category"])
    for name, accuracy, classes in (("binary", binary_accuracy, 2), ("category", category_accuracy, 5)):
        ax = figures[f"confusion_matrix_{name}.png"].axes[0]
        assert f"head '{name}'" in ax.get_title() and f"accuracy {accuracy:.4f} on 40 examples" in ax.get_title()
        assert ax.get_images()[0].get_array().shape == (classes, classes)


def test_keras_model_reloads_and_predicts_the_same(trained, mlflow_store: str, tmp_path: Path) -> None:
    model, _, _, splits = trained
    with mlflow.start_run(experiment_id=MlflowClient().create_experiment("keras")) as run:
        assert report.log_keras_model(model) == "keras/model.keras"
    assert [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "keras")] == ["keras/model.keras"]
    local = MlflowClient().download_artifacts(run.info.run_id, "keras/model.keras", str(tmp_path))
    reloaded = keras.saving.load_model(local)
    images, _ = next(splits.test.as_numpy_iterator())
    np.testing.assert_allclose(reloaded.predict_on_batch(images), model.predict_on_batch(images), rtol=1e-6)
    # Where pipeline.inspect looks for it, by run id alone; and to a run that is not active.
    inspected = load_keras_model(f"runs:/{run.info.run_id}")
    assert [layer.name for layer in inspected.layers] == [layer.name for layer in model.layers]
    assert report.log_keras_model(model, run_id=run.info.run_id) == "keras/model.keras"


def test_keras_model_failure_is_a_warning(mlflow_store: str, caplog) -> None:
    model = mlp.build(InputSpec(shape=(8, 8, 1)), hidden_units=[4])
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking.report"):
        assert report.log_keras_model(model, run_id="0" * 32) is None
    assert any(m.startswith("keras/model.keras not logged") for m in caplog.messages), caplog.messages


def test_plots_of_a_real_training_run(in_default_run_store: TrainedRun, tfds_dir: str, tmp_path: Path) -> None:
    """What train() hands over: the guarded model's history and optimizer (the
    gradient-norm guard wraps its rate in ScaledLearningRate), the exported inner model,
    and the `grad_norm` metrics the guard logged into the run (the session's default
    run, 2 epochs, a norm every 10 steps)."""
    run, guarded = in_default_run_store.run, in_default_run_store.model
    cfg = compose_config([*DEFAULT_RUN_OVERRIDES, f"dataset.data_dir={tfds_dir}"])
    assert len(MlflowClient().get_metric_history(run.info.run_id, "grad_norm")) >= 5
    splits = data.load(cfg.dataset, seed=cfg.seed)
    logged = report.log_training_plots(guarded.history.history, guarded.model, guarded.optimizer,
                                       splits.steps_per_epoch * cfg.trainer.epochs, splits.test, splits.input_spec,
                                       run.info.run_id)
    assert {path.removeprefix("plots/") for path in logged} == SINGLE_OUTPUT_PLOTS | {REPORT}
    assert set(logged_pngs(run.info.run_id, tmp_path)) == SINGLE_OUTPUT_PLOTS


def test_learning_rate_plot_of_the_pipelines_scaled_schedule() -> None:
    """`ScaledLearningRate` (what the optimizer holds when the gradient-norm guard is on)
    over a warmed-up cosine, for a run of thousands of steps, in well under a second."""
    import time

    from omegaconf import OmegaConf

    from pipeline.figures import plots

    cfg = OmegaConf.create({"_target_": "keras.optimizers.Adam", "lr": 1e-3, "schedule": "cosine",
                            "warmup_epochs": 1, "min_lr_ratio": 0.0, "global_clipnorm": None})
    scale = tf.Variable(0.5, trainable=False)
    optimizer = optim.build(cfg, steps_per_epoch=469, epochs=10, lr_scale=scale)
    start = time.perf_counter()
    figure = plots.learning_rate_schedule(optimizer, 4690)
    assert time.perf_counter() - start < 5.0, "evaluated in one traced call, not 4690 eager ones"
    ax = figure.axes[0]
    assert ax.get_title() == "CosineDecay x 0.5"
    rates = ax.get_lines()[0].get_ydata()
    schedule = optimizer._learning_rate
    for step in (0, 100, 469, 2000, 4689):
        assert rates[step] == pytest.approx(float(schedule(step)), rel=1e-5)
    assert rates[469] == pytest.approx(0.5e-3, rel=1e-5), "warmup ends at the scaled peak"
