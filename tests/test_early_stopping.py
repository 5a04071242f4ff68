"""`callbacks.early_stopping.EarlyStopping`: Keras's, with its progress carried by a
checkpoint. Driven epoch by epoch with chosen validation values, on a real Keras model;
the state crosses to a fresh callback (a resumed process) through a real checkpoint."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from callbacks.early_stopping import EarlyStopping


def tiny_model() -> keras.Model:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(loss="mse", metrics=["accuracy"])
    return model


def set_weights_to(model: keras.Model, value: float) -> None:
    model.set_weights([np.full(w.shape, value, w.dtype) for w in model.get_weights()])


def resumed(callback: EarlyStopping, model: keras.Model, tmp_path: Path, **kwargs) -> EarlyStopping:
    """What a resumed process holds: a new callback whose state is read back from a
    checkpoint of `callback`'s, written as `Checkpointing` writes it (`before_save` first)."""
    callback.before_save()
    path = tf.train.Checkpoint(state=callback.checkpoint_state()).write(str(tmp_path / "ckpt"))
    again = EarlyStopping(**kwargs)
    again.set_model(model)
    again.on_train_begin()
    tf.train.Checkpoint(state=again.checkpoint_state()).read(path).assert_consumed()
    again.after_restore()
    return again


def test_patience_best_value_and_best_weights_survive_a_resume(tmp_path: Path) -> None:
    model = tiny_model()
    first = EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    first.set_model(model)
    first.on_train_begin()
    assert not first.has_best_weights
    set_weights_to(model, 1.0)
    first.on_epoch_end(0, {"val_loss": 0.5})  # the best epoch: its weights are kept
    set_weights_to(model, 2.0)
    first.on_epoch_end(1, {"val_loss": 0.7})  # worse: one epoch of patience spent
    assert (first.best, first.best_epoch, first.wait, first.has_best_weights) == (0.5, 0, 1, True)

    second = resumed(first, model, tmp_path, monitor="val_loss", patience=2, restore_best_weights=True)
    assert (second.best, second.best_epoch, second.wait, second.has_best_weights) == (0.5, 0, 1, True)
    set_weights_to(model, 3.0)
    second.on_epoch_end(2, {"val_loss": 0.6})  # still worse than epoch 0: patience runs out
    assert model.stop_training and second.stopped_epoch == 2
    second.on_train_end()
    assert all(np.all(w == 1.0) for w in model.get_weights())  # epoch 0's weights, restored
    assert second.run_tags() == {"early_stopping.best_epoch": "1", "early_stopping.stopped_epoch": "3",
                                 "early_stopping.restored_epoch": "1"}


def test_a_save_after_an_improvement_carries_the_new_best(tmp_path: Path) -> None:
    # Only the counters that changed are written at a save: the ones that changed after
    # an earlier save must still reach the checkpoint.
    model = tiny_model()
    first = EarlyStopping(monitor="val_loss", patience=3)
    first.set_model(model)
    first.on_train_begin()
    first.before_save()  # the initial save, before any epoch: no best yet
    first.on_epoch_end(0, {"val_loss": 0.9})
    first.before_save()
    first.on_epoch_end(1, {"val_loss": 1.5})
    first.before_save()
    first.on_epoch_end(2, {"val_loss": 0.4})
    second = resumed(first, model, tmp_path, monitor="val_loss", patience=3)
    assert (second.best, second.best_epoch, second.wait) == (0.4, 2, 0)
    assert not second.has_best_weights  # restore_best_weights=False keeps none


def test_a_maximised_metric_and_min_delta_decide_as_keras_does() -> None:
    for values, improved in (((0.50, 0.55), [True, True]), ((0.50, 0.505), [True, False]),
                             ((0.50, float("nan")), [True, False])):
        model = tiny_model()
        ours = EarlyStopping(monitor="val_accuracy", mode="max", min_delta=0.01, patience=5)
        theirs = keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", min_delta=0.01, patience=5)
        decisions = []
        for callback in (ours, theirs):
            callback.set_model(model)
            callback.on_train_begin()
            waits = []
            for epoch, value in enumerate(values):
                callback.on_epoch_end(epoch, {"val_accuracy": value})
                waits.append(callback.wait == 0)
            decisions.append(waits)
        assert decisions[0] == decisions[1] == improved, values
