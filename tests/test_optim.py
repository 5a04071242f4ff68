"""The pipeline's Adam: Keras's update, applied by TensorFlow's fused kernel."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.config import compose
from pipeline.training import optim


def seeded_model() -> keras.Model:
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((20,)), keras.layers.Dense(32, activation="relu"),
                             keras.layers.BatchNormalization(), keras.layers.Dense(3, activation="softmax")])


def trained_weights(optimizer, steps: int = 6) -> list[np.ndarray]:
    model = seeded_model()
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", steps_per_execution=2)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32 * steps, 20)).astype("float32"), rng.integers(0, 3, 32 * steps)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    return model.get_weights()


def assert_same_training(ours: list[np.ndarray], theirs: list[np.ndarray]) -> None:
    """The two optimizers trained every weight of the seeded model to the same values, and
    training moved them: two optimizers that both did nothing would also agree."""
    initial = seeded_model().get_weights()
    assert len(ours) == len(theirs) == len(initial) > 0
    for mine, reference in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(mine, reference, atol=1e-6, rtol=1e-5)
    kernels = [(before, after) for before, after in zip(initial, theirs, strict=True) if before.ndim == 2]
    assert kernels and all(not np.allclose(before, after) for before, after in kernels), "no kernel moved"


@pytest.mark.parametrize("options", [{}, {"global_clipnorm": 0.5}, {"weight_decay": 0.01}, {"amsgrad": True},
                                     {"beta_1": 0.8, "beta_2": 0.99, "epsilon": 1e-4}])
def test_fused_adam_matches_keras_adam(options):
    fused, reference = optim.Adam(1e-2, **options), keras.optimizers.Adam(1e-2, **options)
    assert_same_training(trained_weights(fused), trained_weights(reference))
    assert fused._fused


def test_fused_adam_follows_a_schedule_and_a_loss_scale():
    schedule = keras.optimizers.schedules.CosineDecay(1e-2, decay_steps=4)
    fused = keras.optimizers.LossScaleOptimizer(optim.Adam(schedule))
    assert_same_training(trained_weights(fused),
                         trained_weights(keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(schedule))))
    assert fused.inner_optimizer._fused


def test_keras_update_under_a_distribution_strategy():
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        assert not optim.Adam(1e-3)._fused


def test_default_optimizer_is_the_fused_adam_and_round_trips():
    cfg = compose([])
    optimizer = optim.build(cfg.optimizer, steps_per_epoch=10, epochs=2)
    assert type(optimizer) is optim.Adam
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(optimizer))
    assert type(restored) is optim.Adam and restored.get_config() == optimizer.get_config()
