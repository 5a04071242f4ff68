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


@pytest.mark.parametrize("halt", [True, False], ids=["stop", "skip"])
def test_a_nan_anywhere_in_a_16_step_execution_is_caught_at_its_step(halt: bool) -> None:
    """The checks run inside the compiled step: whichever of an execution's 16 steps
    has a non-finite input, that step is recorded (position and norms), its update is
    never applied, and with `halt` (stop, rollback) neither is any later one."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense"),
                              keras.layers.Dense(3, name="head")])
    guarded = GuardedModel(model, StepGuard(halt_on_bad_step=halt), epoch=tf.Variable(0, dtype=tf.int64),
                           steps_per_epoch=10**6)
    guarded.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    steps_per_execution=16)
    x = np.ones([16, 2, 4], np.float32)
    y = np.zeros([16, 2], np.int64)
    guarded.build_metrics((x[0], y[0]))
    state = guarded.build_train_state()
    train_function = guarded.make_train_function()
    for position in range(16):
        bad = x.copy()
        bad[position, 1, 2] = np.nan
        before = [w.numpy() for w in model.weights]
        iterations = int(guarded.optimizer.iterations.numpy())
        train_function(iter(tf.data.Dataset.from_tensor_slices((bad, y))))
        snapshot = state.snapshot()
        first = int(state.global_batch.numpy()) - 16  # the execution's first step
        assert (snapshot.bad_step, snapshot.bad_batch) == (first + position, first + position), position
        assert np.isnan(snapshot.bad_loss) and snapshot.bad_layer_norms.shape == (2,)
        applied = int(guarded.optimizer.iterations.numpy()) - iterations
        if halt:  # the steps before it trained, the bad one and every later one did not
            assert snapshot.halted and applied == position
            if position == 0:
                assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))
        else:  # only the bad step was dropped, and counted
            assert not snapshot.halted and applied == 15
            assert snapshot.dropped_steps == position + 1  # one per execution so far, this epoch
        assert all(np.isfinite(w.numpy()).all() for w in model.weights)
        state.clear_bad_step()
