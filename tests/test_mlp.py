"""The `mlp` builder: shapes, pinned size, raw-image input, save/export round trips."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from architectures import InputSpec
from architectures.mlp import build

DIGITS = InputSpec(shape=(8, 8, 1), dtype="uint8", num_classes=10)
MNIST = InputSpec(shape=(28, 28, 1), dtype="uint8", num_classes=10)


def raw_images(spec: InputSpec, n: int = 5) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, *spec.shape), dtype=np.uint8)


@pytest.mark.parametrize(
    "spec, parameters",
    [
        # (8*8*512 + 512) + (512*256 + 256) + (256*10 + 10)
        (DIGITS, 167_178),
        # (28*28*512 + 512) + (512*256 + 256) + (256*10 + 10)
        (MNIST, 535_818),
    ],
)
def test_builds_for_each_input_spec(spec: InputSpec, parameters: int) -> None:
    model = build(spec)
    assert model.count_params() == parameters
    assert model.inputs[0].dtype == "uint8"
    probabilities = model(raw_images(spec), training=False)
    assert probabilities.shape == (5, 10)
    assert probabilities.dtype == "float32"
    np.testing.assert_allclose(np.sum(probabilities, axis=1), 1.0, rtol=1e-5)


def test_output_stays_float32_under_mixed_precision() -> None:
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build(DIGITS)
        assert model.get_layer("dense_1").compute_dtype == "bfloat16"
        assert model(raw_images(DIGITS)).dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_one_training_step_changes_weights_and_stays_finite() -> None:
    keras.utils.set_random_seed(0)
    model = build(DIGITS)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    loss = model.train_on_batch(raw_images(DIGITS, 32), np.arange(32) % 10)
    assert np.isfinite(loss)
    assert all(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


@pytest.mark.parametrize("bad, message", [
    ({"dropout": 1.0}, "dropout must be in"),
    ({"hidden_units": []}, "hidden_units must be a non-empty list"),
    ({"hidden_units": [64, 0]}, "hidden_units must be a non-empty list"),
])
def test_bad_hyperparameters_raise_value_error(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(DIGITS, **bad)


def test_keras_file_round_trip(tmp_path) -> None:
    model = build(DIGITS)
    path = tmp_path / "mlp.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    images = raw_images(DIGITS)
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), model.predict(images, verbose=0), rtol=1e-6)


def test_saved_model_export_reloads_with_plain_tensorflow(tmp_path) -> None:
    model = build(DIGITS)
    model.export(str(tmp_path / "saved"), verbose=False)
    reloaded = tf.saved_model.load(str(tmp_path / "saved"))
    images = raw_images(DIGITS)
    np.testing.assert_allclose(reloaded.serve(images).numpy(), model.predict(images, verbose=0), rtol=1e-5, atol=1e-6)
