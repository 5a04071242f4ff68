"""pipeline.figures.plots on real inputs: a real Keras History, real schedules, a real model."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from importlib.util import find_spec
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import require_program

from architectures import InputSpec, mlp
from pipeline import notices
from pipeline.figures import activations, learning_rates, plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG_MAGIC


def lines_by_label(ax) -> dict[str, np.ndarray]:
    return {line.get_label(): np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()}


@pytest.fixture(scope="module")
def history() -> dict[str, list[float]]:
    """A real Keras History of 3 epochs with a validation split."""
    keras.utils.set_random_seed(0)
    model = mlp.build(InputSpec(shape=(8, 8, 1)), hidden_units=[16])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, size=64)
    return model.fit(images, labels, validation_split=0.25, epochs=3, batch_size=16, verbose=0).history


def test_learning_curves_one_subplot_per_metric_with_train_and_val(history) -> None:
    assert set(history) == {"loss", "val_loss", "accuracy", "val_accuracy"}
    figure = plots.learning_curves(history)
    assert [ax.get_title() for ax in figure.axes] == ["loss", "accuracy"]
    for ax in figure.axes:
        assert ax.get_xlabel() == "epoch"
        lines = lines_by_label(ax)
        assert set(lines) == {"train", "val"}
        np.testing.assert_allclose(lines["train"], history[ax.get_title()])
        np.testing.assert_allclose(lines["val"], history[f"val_{ax.get_title()}"])
        np.testing.assert_array_equal(ax.get_lines()[0].get_xdata(), [0, 1, 2])


def test_learning_curves_accepts_train_prefixed_and_per_head_keys() -> None:
    history = {
        "train_loss": [1.0, 0.5], "val_loss": [1.1, 0.7],
        "train_binary_accuracy": [0.6, 0.8], "val_binary_accuracy": [0.5, 0.75],
        "lr": [1e-3, 5e-4],
    }
    figure = plots.learning_curves(history)
    assert [ax.get_title() for ax in figure.axes] == ["loss", "binary_accuracy", "lr"]
    np.testing.assert_allclose(lines_by_label(figure.axes[1])["val"], [0.5, 0.75])
    assert set(lines_by_label(figure.axes[2])) == {"train"}, "a metric without val_ has one line"
    with pytest.raises(ValueError, match="at least one metric"):
        plots.learning_curves({})


def test_learning_curves_lays_out_many_metrics_in_rows() -> None:
    history = {f"m{i}": [float(i)] for i in range(4)}
    assert len(plots.learning_curves(history).axes) == 4, "unused grid cells are removed"


def test_confusion_counts_match_a_direct_count() -> None:
    rng = np.random.default_rng(1)
    labels, predictions = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    expected = np.zeros((4, 4), dtype=int)
    for true, predicted in zip(labels, predictions):
        expected[true, predicted] += 1
    counts = plots.confusion_counts(labels, predictions, 4)
    np.testing.assert_array_equal(counts, expected)
    assert counts.sum() == 200
    with pytest.raises(ValueError, match=r"predictions must be in \[0, 3\)"):
        plots.confusion_counts([0, 1], [0, 3], 3)


def test_confusion_matrix_draws_and_annotates_counts(tmp_path: Path) -> None:
    labels, predictions = [0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0]
    figure = plots.confusion_matrix(labels, predictions, 3, title="mlp on digits[test]")
    ax = figure.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    assert sorted(int(t.get_text()) for t in ax.texts) == sorted([1, 1, 0, 0, 1, 0, 1, 0, 2])
    assert ax.get_title().startswith("mlp on digits[test]\naccuracy 0.6667 on 6 examples")
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "true")
    assert_png(plots.save(figure, tmp_path / "sub" / "confusion.png"))


def test_confusion_matrix_leaves_many_classes_unannotated() -> None:
    classes = np.arange(25)
    ax = plots.confusion_matrix(classes, classes, 25).axes[0]
    assert len(ax.texts) == 0
    assert np.trace(ax.images[0].get_array()) == 25


def test_grad_norm_history_log_scale_threshold_and_non_finite_steps() -> None:
    steps = np.arange(6)
    norms = [1.0, 2.0, 4.0, 50.0, np.inf, np.nan]
    per_layer = {"dense_1/kernel": (steps[:4], [0.5, 1.0, 2.0, 30.0])}
    ax = plots.grad_norm_history(steps, norms, threshold=10.0, per_layer=per_layer).axes[0]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "step"
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["global"].get_ydata(), norms)
    np.testing.assert_allclose(lines["dense_1/kernel"].get_ydata(), [0.5, 1.0, 2.0, 30.0])
    threshold = lines["threshold 10"]
    assert threshold.get_linestyle() == "--"
    np.testing.assert_allclose(threshold.get_ydata(), [10.0, 10.0])
    marked = [line.get_xdata()[0] for line in ax.get_lines() if line.get_color() == "red"]
    assert marked == [4, 5], "the inf and nan steps are marked"


def test_learning_rate_schedule_evaluates_a_keras_cosine_schedule() -> None:
    # Warmup makes CosineDecay branch on a scalar step: the step-by-step fallback.
    warm = keras.optimizers.schedules.CosineDecay(0.0, decay_steps=40, warmup_target=0.1, warmup_steps=10)
    plain = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=50, alpha=0.1)
    for schedule in (warm, plain):
        ax = plots.learning_rate_schedule(schedule, 50).axes[0]
        assert ax.get_xlabel() == "step" and ax.get_title() == "CosineDecay"
        (line,) = ax.get_lines()
        np.testing.assert_array_equal(line.get_xdata(), np.arange(50))
        expected = [float(keras.ops.convert_to_numpy(schedule(step))) for step in range(50)]
        np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-6)
    rates = learning_rates.learning_rates(warm, 50)
    assert rates[0] == 0.0 and rates[10] == pytest.approx(0.1) and rates[49] < rates[10]


def test_learning_rate_schedule_of_an_optimizer_or_a_constant() -> None:
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=5, decay_rate=0.5)
    wrapped = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(schedule))
    (line,) = plots.learning_rate_schedule(wrapped, 11).axes[0].get_lines()
    np.testing.assert_allclose(line.get_ydata()[[0, 5, 10]], [0.01, 0.005, 0.0025], rtol=1e-6)

    for constant in (3e-4, keras.optimizers.SGD(3e-4)):
        ax = plots.learning_rate_schedule(constant, 20).axes[0]
        np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), np.full(20, 3e-4), rtol=1e-6)
        assert ax.get_title() == "constant learning rate"
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        plots.learning_rate_schedule(0.1, 0)


def test_activation_histogram_counts_finite_values() -> None:
    values = np.array([[0.0, 1.0, 1.0, np.nan], [2.0, np.inf, 0.5, 0.5]])
    ax = activations.activation_histogram("dense_1", values, bins=4).axes[0]
    assert sum(patch.get_height() for patch in ax.patches) == 6
    assert ax.get_title() == "dense_1  (2, 4)  (2 non-finite not shown)"


@pytest.fixture
def tiny_model() -> keras.Model:
    return mlp.build(InputSpec(shape=(8, 8, 1)), hidden_units=[8])


def test_architecture_diagram_writes_a_png(tiny_model, tmp_path: Path) -> None:
    require_program("dot", "apt-get install graphviz")
    path = plots.architecture_diagram(tiny_model, tmp_path / "diagrams" / "mlp.png")
    assert path == tmp_path / "diagrams" / "mlp.png"
    assert_png(path)


def test_architecture_diagram_without_graphviz_warns_once(
    tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` on it
    monkeypatch.setattr(notices, "_said", set())  # a fresh process
    with caplog.at_level(logging.WARNING, logger="pipeline.figures.plots"):
        assert plots.architecture_diagram(tiny_model, tmp_path / "a.png") is None
        assert plots.architecture_diagram(tiny_model, tmp_path / "b.png") is None
    assert not (tmp_path / "a.png").exists()
    warnings = [r.getMessage() for r in caplog.records if r.name == "pipeline.figures.plots"]
    assert warnings == ["architecture diagrams skipped: Graphviz's `dot` program (`apt-get install graphviz`) "
                        "missing"]


def test_missing_graphviz_is_a_warning_once_per_mlflow_store(
    tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Every run of every sweep job used to warn: that buries the warnings that are news.
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "pydot" else find_spec(name, *args))  # no pydot
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)  # nor Graphviz's `dot`
    store = f"sqlite:///{tmp_path}/mlflow.db"
    (tmp_path / "other").mkdir()

    def run(store: str | None, new_process: bool = False) -> tuple[str, str]:
        if new_process:
            monkeypatch.setattr(notices, "_said", set())
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="pipeline.figures.plots"):
            assert plots.architecture_diagram(tiny_model, tmp_path / "a.png", store=store) is None
        [record] = [r for r in caplog.records if r.name == "pipeline.figures.plots"]
        return record.levelname, record.getMessage()

    missing = ("architecture diagrams skipped: the pydot package (`pip install pydot`) and Graphviz's `dot` program "
               "(`apt-get install graphviz`) missing")
    assert run(store, new_process=True) == ("WARNING", f"{missing} (said once per MLflow store)")
    assert run(store) == ("DEBUG", missing)  # the next job of a sweep
    assert run(store, new_process=True) == ("INFO", missing)  # the next run on this store
    assert run(store, new_process=True) == ("INFO", missing)
    assert run(f"sqlite:///{tmp_path}/other/mlflow.db")[0] == "WARNING"  # another store is told too
    assert run("http://127.0.0.1:5000")[0] == "WARNING"  # a remote store: once per process
    assert run("http://127.0.0.1:5000")[0] == "DEBUG"
    assert run("http://127.0.0.1:5000", new_process=True)[0] == "WARNING"
    marker = tmp_path / ".mlflow.db.graphviz-missing"  # beside the store; delete it to be told again
    assert missing in marker.read_text() and not (tmp_path / "a.png").exists()


@pytest.mark.parametrize("store, marker", [
    ("sqlite:////data/runs/mlflow.db", "/data/runs/.mlflow.db.n"),
    ("sqlite:///mlflow.db?timeout=20", "{cwd}/.mlflow.db.n"),
    ("file:///data/mlruns", "/data/.mlruns.n"),
    ("mlruns", "{cwd}/.mlruns.n"),
    ("http://127.0.0.1:5000", None),
    ("postgresql+psycopg2://user@host/db", None),
    ("sqlite:///:memory:", None),
    (None, None),
])
def test_notice_markers_sit_beside_local_stores(store: str | None, marker: str | None) -> None:
    expected = None if marker is None else Path(marker.format(cwd=Path.cwd()))
    assert notices.marker_path("n", store) == expected


def test_save_writes_a_png(history, tmp_path: Path) -> None:
    assert_png(plots.save(plots.learning_curves(history), tmp_path / "curves.png"))
