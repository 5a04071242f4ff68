"""What a finished training run shows besides numbers: its figures under `plots/` and
its Keras model as `keras/model.keras` (read by `pipeline.inspect`).

    from pipeline.tracking import report
    report.log_training_plots(history.history, model, optimizer, total_steps, splits.test,
                              splits.input_spec, run.info.run_id)
    report.log_keras_model(model)

Both only add artifacts to a run that has already trained: a figure or a file that
cannot be made is skipped with a warning naming it, never a failed run.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from pipeline.figures import plots

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

    from architectures.common import InputSpec

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
KERAS_ARTIFACT = "keras/model.keras"  # where pipeline.inspect looks for it
# A legend of more layers than this is unreadable: the layers with the largest peak
# gradient norm are drawn, the rest left to the run's `grad_norm/<layer>` metrics.
MAX_LAYERS_DRAWN = 12


def log_training_plots(
    history: Mapping[str, Sequence[float]],
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    total_steps: int,
    test_data: tf.data.Dataset,
    input_spec: InputSpec,
    run_id: str,
    grad_norm_threshold: float | None = None,
    class_names: Sequence[str] = (),
    label_names: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """Log the run's figures as PNGs under `plots/` of run `run_id`.

    - `learning_curves.png`: every metric of `history`, train and validation per epoch;
    - `confusion_matrix.png` on `test_data`, or `confusion_matrix_<head>.png` per output
      head of a multi-output model (a 1-unit sigmoid head is binary), its axes labelled
      with the class names; and `classification_report.txt` (`_<head>` likewise):
      precision, recall, F1 and support of each class, by name;
    - `grad_norm.png`: the run's logged `grad_norm` metric per step and its
      `grad_norm/<layer>` metrics (the 12 layers with the largest peak norm), with
      `grad_norm_threshold` as a line; skipped when the run logged no `grad_norm`;
    - `learning_rate.png`: the optimizer's schedule over `total_steps` (through
      `ScaledLearningRate`, at its current scale, and `LossScaleOptimizer`);
    - `architecture.png`: `plots.architecture_diagram`; skipped without Graphviz
      (`model_summary.txt` describes the model then).

    Args:
        history: Keras' `History.history` (`loss`, `val_loss`, `accuracy`, ...).
        model: the trained model, as exported (not a training wrapper around it).
        optimizer: the optimizer it trained with.
        total_steps: optimizer steps the schedule was built for (steps per epoch x
            configured epochs).
        test_data: batched (inputs, labels) elements, labels a dict per head for a
            multi-output model.
        input_spec: the dataset's `InputSpec`: class count, or heads.
        run_id: the run to log to (need not be active).
        grad_norm_threshold: drawn on the gradient-norm figure, e.g. the guard's threshold.
        class_names: of a single-output model's classes, in output order; () numbers them.
        label_names: of each head's classes, for a multi-output model.

    Returns:
        The artifact paths logged, e.g. ["plots/learning_curves.png", ...].
    """
    client = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        # (what, how): each makes {file name: figure, or a file already written, or None}.
        makers: list[tuple[str, Callable[[], Mapping[str, Figure | Path | None]]]] = [
            ("learning curves", lambda: {"learning_curves.png": plots.learning_curves(history)}),
            ("confusion matrix", lambda: _confusion_matrices(model, test_data, input_spec, class_names, label_names)),
            ("gradient norm", lambda: {"grad_norm.png": _grad_norm_figure(client, run_id, grad_norm_threshold)}),
            ("learning rate", lambda: {"learning_rate.png": plots.learning_rate_schedule(optimizer, total_steps)}),
            ("architecture", lambda: {"architecture.png": plots.architecture_diagram(
                model, directory / "architecture.png", store=mlflow.get_tracking_uri())}),
        ]
        written: list[str] = []
        for what, make in makers:
            try:
                for name, figure in make().items():
                    if figure is None:  # nothing to draw: said where it was decided
                        continue
                    if isinstance(figure, str):  # a text report
                        (directory / name).write_text(figure)
                    elif isinstance(figure, Figure):
                        plots.save(figure, directory / name)
                        # Built without pyplot: there is no global figure to close; it
                        # goes with its last reference, and clearing frees it now.
                        figure.clear()
                    written.append(name)
            except Exception as error:
                log.warning("plot %s skipped: %s: %s", what, type(error).__name__, error)
                log.debug("plot %s failed", what, exc_info=True)
        if not written:
            return []
        try:
            client.log_artifacts(run_id, str(directory), PLOTS_DIR)
        except Exception as error:  # e.g. the artifact store went away after training
            log.warning("plots not logged to run %s: %s: %s", run_id, type(error).__name__, error)
            return []
    return [f"{PLOTS_DIR}/{name}" for name in written]


def log_augmented_examples(batch: tuple, class_names: Sequence[str], run_id: str, count: int = 16) -> str | None:
    """`plots/augmented_examples.png`: the first `count` examples of a training batch as
    augmentation left them (`batch`: (inputs, labels), inputs the images or a dict with
    `image`). Never fails the run: a warning instead."""
    try:
        inputs, labels = batch
        images = inputs["image"] if isinstance(inputs, Mapping) else inputs
        labels = next(iter(labels.values())) if isinstance(labels, Mapping) else labels
        figure = plots.image_grid(np.asarray(images)[:count], np.asarray(labels).reshape(-1)[:count], class_names,
                                  title="augmented training examples (epoch 1, batch 1)")
        MlflowClient().log_figure(run_id, figure, f"{PLOTS_DIR}/augmented_examples.png")
        figure.clear()
    except Exception as error:
        log.warning("plot augmented examples skipped: %s: %s", type(error).__name__, error)
        return None
    return f"{PLOTS_DIR}/augmented_examples.png"


def log_keras_model(model: keras.Model, run_id: str | None = None) -> str | None:
    """Save `model` in Keras' format and log it as `keras/model.keras` of run `run_id`
    (default: the active run), where `pipeline.inspect model=runs:/RUN_ID` finds it.

    The `.keras` file keeps every layer (the SavedModel keeps only the serving
    function), so per-layer inspection works; custom layers need `import
    architectures` to load.

    Returns:
        The artifact path, or None (with a warning) when it could not be saved or logged.
    """
    import keras
    import mlflow

    try:
        run_id = run_id or mlflow.active_run().info.run_id
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(KERAS_ARTIFACT).name
            keras.saving.save_model(model, path)
            MlflowClient().log_artifact(run_id, str(path), str(Path(KERAS_ARTIFACT).parent))
    except Exception as error:
        log.warning("%s not logged (pipeline.inspect will not find it): %s: %s", KERAS_ARTIFACT,
                    type(error).__name__, error)
        return None
    return KERAS_ARTIFACT


def predicted_classes(probabilities: np.ndarray) -> np.ndarray:
    """(N,) classes from (N, 1) sigmoid probabilities (> 0.5) or (N, C) softmax ones."""
    probabilities = np.asarray(probabilities)
    if probabilities.ndim == 2 and probabilities.shape[-1] == 1:
        return (probabilities[:, 0] > 0.5).astype(np.int64)
    return probabilities.argmax(axis=-1)


def _confusion_matrices(model: keras.Model, test_data: tf.data.Dataset, input_spec: InputSpec,
                        class_names: Sequence[str] = (),
                        label_names: Mapping[str, Sequence[str]] | None = None) -> dict[str, Figure | str]:
    """One figure and one per-class report (text) per output head, from one pass over
    `test_data`, the classes named by `class_names` (or, per head, `label_names`)."""
    import keras
    import tensorflow as tf

    truth: dict[str, list[np.ndarray]] = {}
    predicted: dict[str, list[np.ndarray]] = {}
    for inputs, labels in test_data.as_numpy_iterator():
        # Under a tf.distribute strategy, predict_on_batch would give every replica the whole batch.
        outputs = keras.tree.map_structure(np.asarray, model(inputs, training=False)) \
            if tf.distribute.has_strategy() else model.predict_on_batch(inputs)
        outputs, labels = _by_head(outputs, input_spec), _by_head(labels, input_spec)
        for head, probabilities in outputs.items():
            truth.setdefault(head, []).append(np.asarray(labels[head]).reshape(-1))
            predicted.setdefault(head, []).append(predicted_classes(probabilities))
    classes = dict(input_spec.heads) if input_spec.heads else {"": input_spec.num_classes}
    names = dict(label_names or {}) if input_spec.heads else {"": tuple(class_names)}
    figures: dict[str, Any] = {}
    for head in truth:
        title = f"{model.name}: test split" + (f", head {head!r}" if head else "")
        suffix = f"_{head}" if head else ""
        head_names = tuple(names.get(head) or ()) or tuple(str(index) for index in range(classes[head]))
        true, guessed = np.concatenate(truth[head]), np.concatenate(predicted[head])
        figures[f"confusion_matrix{suffix}.png"] = plots.confusion_matrix(true, guessed, classes[head], title=title,
                                                                          class_names=head_names)
        figures[f"classification_report{suffix}.txt"] = plots.per_class_report(true, guessed, head_names)
    return figures


def _by_head(values: Any, input_spec: InputSpec) -> dict[str, Any]:
    """Model outputs or labels as {head: array}; "" names the only head of a
    single-output model. A list of outputs follows the order of `input_spec.heads`."""
    if isinstance(values, Mapping):
        return dict(values)
    if isinstance(values, (list, tuple)) and input_spec.heads:
        return {name: value for (name, _), value in zip(input_spec.heads, values)}
    return {"": values}


def _grad_norm_figure(client: MlflowClient, run_id: str, threshold: float | None) -> Figure | None:
    """The run's `grad_norm` and `grad_norm/<layer>` histories, or None if it has none."""
    logged = client.get_run(run_id).data.metrics  # latest value of every key
    if "grad_norm" not in logged:
        log.debug("no grad_norm metric in run %s: gradient-norm plot skipped", run_id)
        return None
    keys = [key for key in logged if key == "grad_norm" or key.startswith("grad_norm/")]
    histories = {}
    for key in keys:
        points = sorted(client.get_metric_history(run_id, key), key=lambda metric: metric.step)
        histories[key] = ([m.step for m in points], [m.value for m in points])
    steps, norms = histories.pop("grad_norm")
    layers = sorted(histories, key=lambda key: max(histories[key][1]), reverse=True)[:MAX_LAYERS_DRAWN]
    per_layer = {key.removeprefix("grad_norm/"): histories[key] for key in sorted(layers)}
    return plots.grad_norm_history(steps, norms, threshold=threshold, per_layer=per_layer)
