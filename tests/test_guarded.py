"""The pipeline's train function over one iterator of consecutive epochs: several steps
per execution, and still every epoch trains on exactly its own batches."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline import data
from pipeline.training.guarded import GuardedModel, TrainProgress
from pipeline.training.train_state import StepGuard

STEPS_PER_EPOCH = 5  # 4 steps per execution do not divide it: executions of 4 and 1


def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
    """Epoch e: STEPS_PER_EPOCH batches of 2 examples, every label e (mod 3)."""
    label = tf.math.floormod(epoch, 3)
    return tf.data.Dataset.range(STEPS_PER_EPOCH).map(
        lambda _: (tf.ones([2, 4]), tf.fill([2], label)))


def label_mean(y_true, y_pred):
    return tf.reduce_mean(tf.cast(y_true, tf.float32))


def fit(steps_per_epoch: int | None, epochs: int = 4, initial_epoch: int = 0,
        steps_per_execution: int = 4) -> tuple[dict, GuardedModel]:
    """A 4-to-3 dense layer trained on `epoch_batches`, from one iterator, as the pipeline does."""
    keras.utils.set_random_seed(0)
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    guarded = GuardedModel(model, StepGuard(), epoch=epoch, steps_per_epoch=steps_per_epoch)
    guarded.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=[label_mean], steps_per_execution=steps_per_execution)
    history = guarded.fit(data.consecutive_epochs(epoch_batches, epoch), steps_per_epoch=STEPS_PER_EPOCH,
                          epochs=epochs, initial_epoch=initial_epoch, callbacks=[TrainProgress()], verbose=0)
    return history.history, guarded


def test_each_epoch_trains_on_its_own_batches_with_several_steps_per_execution() -> None:
    history, guarded = fit(STEPS_PER_EPOCH)
    # The epoch's mean label is its number (mod 3) only if no batch of another epoch ran in it.
    assert history["label_mean"] == pytest.approx([0.0, 1.0, 2.0, 0.0])
    state = guarded.train_state
    assert int(state.epoch.numpy()) == 3
    assert int(state.batch.numpy()) == STEPS_PER_EPOCH
    assert int(state.global_batch.numpy()) == 4 * STEPS_PER_EPOCH
    assert int(guarded.optimizer.iterations.numpy()) == 4 * STEPS_PER_EPOCH


def test_keras_own_train_function_would_run_across_epoch_ends() -> None:
    """Why the pipeline has its own train function: Keras's runs 4 steps per execution
    while data remains, so epoch 0's second execution takes 3 batches of epoch 1."""
    history, guarded = fit(None)
    assert history["label_mean"][0] > 0.0
    assert int(guarded.optimizer.iterations.numpy()) == 4 * 8  # two executions of 4 per epoch


def test_a_later_initial_epoch_starts_from_that_epoch_s_batches() -> None:
    history, _ = fit(STEPS_PER_EPOCH, epochs=4, initial_epoch=2)
    assert history["label_mean"] == pytest.approx([2.0, 0.0])


def test_one_step_per_execution_matches_several() -> None:
    """Same data, same updates: the weights after 4 epochs do not depend on steps per execution."""
    _, several = fit(STEPS_PER_EPOCH)
    history, one = fit(STEPS_PER_EPOCH, steps_per_execution=1)
    assert history["label_mean"] == pytest.approx([0.0, 1.0, 2.0, 0.0])
    for a, b in zip(several.model.get_weights(), one.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
