"""Figures of a run: learning curves, confusion matrices, gradient norms, learning-rate
schedules and the architecture diagram (a layer's activation histogram is drawn by
`pipeline.figures.activations`, the rates a schedule gives by `pipeline.figures.learning_rates`).

Every function returns a `matplotlib.figure.Figure` built with the object-oriented API
and touches no pyplot state, so it is safe in a training process, a test or a notebook
(whose backend it leaves alone). Write one with `save(figure, path)` or hand it to
`mlflow.log_figure(figure, "name.png")`.

    from pipeline.figures import plots
    plots.save(plots.learning_curves(history.history), "curves.png")
"""

from __future__ import annotations

import importlib.util
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline import notices
from pipeline.figures.learning_rates import learning_rates, schedule_name, schedule_of

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

# Cells are annotated with their count up to this many classes; beyond it the numbers
# no longer fit in a readable figure and the colours carry the information.
ANNOTATE_MAX_CLASSES = 20
# Keras' plot_model defaults to 200 dpi: a deep model then becomes a PNG of tens of MB.
DIAGRAM_DPI = 96


def learning_curves(history: Mapping[str, Sequence[float]]) -> Figure:
    """One subplot per metric, with its train and validation values per epoch.

    Args:
        history: Keras' `History.history` (`loss`, `val_loss`, `accuracy`,
            `val_binary_accuracy`, ...) or the same with train keys already prefixed
            `train_` (`train_loss`, `val_loss`, ...), metric -> one value per epoch.
            A key without a `val_` counterpart (e.g. `lr`) gets a train line only.

    Returns:
        A figure with one axes per metric (loss first), titled by the metric, x axis
        "epoch".
    """
    curves: dict[str, dict[str, Sequence[float]]] = {}  # metric -> {"train"|"val": values}
    for key, values in history.items():
        if key.startswith("val_"):
            curves.setdefault(key[len("val_"):], {})["val"] = values
        else:
            curves.setdefault(key.removeprefix("train_"), {})["train"] = values
    if not curves:
        raise ValueError("history must hold at least one metric. Received: {}")
    # The loss first, as Keras prints it; then the metrics in the history's order.
    curves = dict(sorted(curves.items(), key=lambda item: item[0] != "loss"))

    columns = min(len(curves), 3)
    rows = math.ceil(len(curves) / columns)
    figure = Figure(figsize=(4.5 * columns, 3.2 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (metric, lines) in zip(axes, curves.items()):
        for role in ("train", "val"):
            if role in lines:
                values = np.asarray(lines[role], dtype=float)
                ax.plot(np.arange(len(values)), values, marker="o", markersize=3, label=role)
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in axes[len(curves):]:  # the unused cells of the last row
        figure.delaxes(ax)
    return figure


def confusion_counts(labels: Sequence[int], predictions: Sequence[int], num_classes: int) -> np.ndarray:
    """Count (true label, predicted label) pairs.

    Args:
        labels: true class of each example, ints in [0, num_classes).
        predictions: predicted class of each example, same length.
        num_classes: number of classes.

    Returns:
        int64 array (num_classes, num_classes): row = true class, column = predicted.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    predictions = np.asarray(predictions, dtype=np.int64).reshape(-1)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels and predictions must have the same length. Received: {len(labels)} and "
                         f"{len(predictions)}")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must be in [0, {num_classes}). Received: {values.min()}..{values.max()}")
    return np.bincount(labels * num_classes + predictions, minlength=num_classes**2).reshape(num_classes, num_classes)


def confusion_matrix(
    labels: Sequence[int], predictions: Sequence[int], num_classes: int, title: str = "confusion matrix",
    class_names: Sequence[str] = (),
) -> Figure:
    """Heat map of `confusion_counts`, annotated with the counts up to 20 classes.

    Args:
        labels: true class of each example.
        predictions: predicted class of each example.
        num_classes: number of classes (the matrix is square).
        title: figure title, e.g. the model and split it describes.
        class_names: the classes' names, in index order, for the axes; () numbers them.

    Returns:
        A figure with one axes: rows are true classes, columns predicted ones.
    """
    counts = confusion_counts(labels, predictions, num_classes)
    side = min(3.0 + 0.45 * num_classes, 14.0)
    figure = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = figure.add_subplot()
    image = ax.imshow(counts, cmap="Blues", interpolation="nearest")
    figure.colorbar(image, ax=ax, shrink=0.8)
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"{title}\naccuracy {accuracy:.4f} on {counts.sum()} examples")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if num_classes <= ANNOTATE_MAX_CLASSES:
        ax.set_xticks(range(num_classes))
        ax.set_yticks(range(num_classes))
        if len(class_names) == num_classes:
            ax.set_xticklabels(class_names, rotation=45 if max(map(len, class_names)) > 3 else 0, ha="right")
            ax.set_yticklabels(class_names)
        threshold = counts.max() / 2
        for true, predicted in np.ndindex(counts.shape):
            ax.text(predicted, true, str(counts[true, predicted]), ha="center", va="center", fontsize=8,
                    color="white" if counts[true, predicted] > threshold else "black")
    return figure


def per_class_report(labels: Sequence[int], predictions: Sequence[int], class_names: Sequence[str]) -> str:
    """Precision, recall, F1 and support of each class, by name, as an aligned text table
    (what `sklearn.metrics.classification_report` prints, from `confusion_counts`)."""
    counts = confusion_counts(labels, predictions, len(class_names)).astype(np.float64)
    true_positive = np.diag(counts)
    precision = np.divide(true_positive, counts.sum(axis=0), out=np.zeros_like(true_positive),
                          where=counts.sum(axis=0) > 0)
    recall = np.divide(true_positive, counts.sum(axis=1), out=np.zeros_like(true_positive),
                       where=counts.sum(axis=1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(true_positive),
                   where=precision + recall > 0)
    width = max(len("class"), *(len(name) for name in class_names))
    rows = [f"{'class':<{width}}  precision  recall  f1-score  support"]
    for index, name in enumerate(class_names):
        rows.append(f"{name:<{width}}  {precision[index]:9.4f}  {recall[index]:6.4f}  {f1[index]:8.4f}  "
                    f"{int(counts[index].sum()):7d}")
    accuracy = true_positive.sum() / max(counts.sum(), 1)
    rows.append(f"{'accuracy':<{width}}  {'':9}  {'':6}  {accuracy:8.4f}  {int(counts.sum()):7d}")
    return "\n".join(rows) + "\n"


def image_grid(images: np.ndarray, labels: Sequence[int], class_names: Sequence[str], title: str,
               columns: int = 4) -> Figure:
    """`images` (N, H, W, C), raw values, in a grid, each titled with its class name."""
    images = np.asarray(images)
    rows = max(1, int(np.ceil(len(images) / columns)))
    figure = Figure(figsize=(2.0 * columns, 2.0 * rows + 0.4), layout="constrained")
    figure.suptitle(title)
    for index in range(rows * columns):
        ax = figure.add_subplot(rows, columns, index + 1)
        ax.set_axis_off()
        if index >= len(images):
            continue
        image = images[index].astype(np.float32)
        if image.max() > 1.0:  # raw pixel values (uint8), drawn as they are
            image = np.clip(image / 255.0, 0.0, 1.0)
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None,
                  interpolation="nearest")
        label = int(labels[index])
        ax.set_title(class_names[label] if label < len(class_names) else str(label), fontsize=9)
    return figure


def grad_norm_history(
    steps: Sequence[int],
    norms: Sequence[float],
    threshold: float | None = None,
    per_layer: Mapping[str, tuple[Sequence[int], Sequence[float]]] | None = None,
) -> Figure:
    """Gradient norm per step on a log scale, to see explosions and vanishing at a glance.

    Args:
        steps: optimizer step of each measurement.
        norms: global gradient norm at each step.
        threshold: drawn as a dashed horizontal line, e.g. the clipping norm or the
            norm a divergence check alarms at.
        per_layer: layer name -> (steps, norms), drawn as thinner lines.

    Returns:
        A figure with one axes, log-scale y. Steps whose global norm is not finite
        (the moment a run diverged) are marked by red vertical lines, since a log
        axis cannot show the value itself.
    """
    steps = np.asarray(steps)
    norms = np.asarray(norms, dtype=float)
    if steps.shape != norms.shape:
        raise ValueError(f"steps and norms must have the same length. Received: {len(steps)} and {len(norms)}")
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    ax = figure.add_subplot()
    ax.plot(steps, norms, linewidth=1.8, color="black", label="global")
    for name, (layer_steps, layer_norms) in (per_layer or {}).items():
        ax.plot(np.asarray(layer_steps), np.asarray(layer_norms, dtype=float), linewidth=0.8, alpha=0.8, label=name)
    for index, step in enumerate(steps[~np.isfinite(norms)]):
        ax.axvline(step, color="red", linestyle=":", linewidth=1.0, label="non-finite" if index == 0 else None)
    if threshold is not None:
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=1.2, label=f"threshold {threshold:g}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm")
    ax.set_title("gradient norm")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    return figure


def learning_rate_schedule(
    optimizer_or_schedule: keras.optimizers.Optimizer | keras.optimizers.schedules.LearningRateSchedule | float,
    total_steps: int,
) -> Figure:
    """The learning rate at every optimizer step of a run.

    Args:
        optimizer_or_schedule: a Keras `LearningRateSchedule`, a constant rate, or an
            optimizer (its schedule or constant rate is used, through a
            `LossScaleOptimizer` too).
        total_steps: number of optimizer steps to draw, e.g. steps per epoch x epochs.

    Returns:
        A figure with one axes: the rate against x axis "step".
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1. Received: {total_steps}")
    schedule = schedule_of(optimizer_or_schedule)
    figure = Figure(figsize=(7, 3.5), layout="constrained")
    ax = figure.add_subplot()
    ax.plot(np.arange(total_steps), learning_rates(schedule, total_steps))
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_title(schedule_name(schedule))
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    return figure


def architecture_diagram(model: keras.Model, path: str | Path, dpi: int = DIAGRAM_DPI, *,
                         store: str | None = None) -> Path | None:
    """Draw the model graph with `keras.utils.plot_model`, nested sub-models expanded.

    Needs the `pydot` package and Graphviz's `dot` program. Without them the diagram
    is skipped, not the caller's work: this returns None and logs a warning saying what
    to install, once per MLflow store (`pipeline.notices`); later runs say it at INFO.

    Args:
        model: a built Sequential or Functional model.
        path: where to write it; the suffix picks the format (.png, .svg, .pdf).
        dpi: resolution of raster formats.
        store: the MLflow tracking URI the diagram is for; None: warn once per process.

    Returns:
        `path`, or None when pydot or Graphviz is missing.
    """
    import keras

    missing = []
    if importlib.util.find_spec("pydot") is None:
        missing.append("the pydot package (`pip install pydot`)")
    if shutil.which("dot") is None:
        missing.append("Graphviz's `dot` program (`apt-get install graphviz`)")
    if missing:
        _report_missing_graphviz(f"{' and '.join(missing)} missing", store)
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # Keras 3.15 raises ImportError when pydot or a working `dot` is missing (its
        # own check runs `dot` on an empty graph), except inside IPython, where it
        # only prints and returns: hence the file check below.
        keras.utils.plot_model(model, to_file=str(path), show_shapes=True, show_dtype=False, expand_nested=True,
                               dpi=dpi)
    except ImportError as error:
        _report_missing_graphviz(f"Keras found no working Graphviz (`apt-get install graphviz`): "
                                 f"{' '.join(str(error).split())}", store)
        return None
    if not path.is_file():
        _report_missing_graphviz("keras.utils.plot_model wrote nothing; is Graphviz (`apt-get install graphviz`) "
                                 "working?", store)
        return None
    return path


def _report_missing_graphviz(reason: str, store: str | None) -> None:
    message = f"architecture diagrams skipped: {reason}"
    level = notices.level("graphviz-missing", store, message)
    once = " (said once per MLflow store)" if store and level == logging.WARNING else ""
    log.log(level, "%s%s", message, once)


def save(figure: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write `figure` as a PNG at `path` (parent folders created) and return the path.

    Nothing global is opened or closed: the figure is garbage-collected with its last
    reference, like any Python object.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=dpi)
    return path
