"""pipeline.input_specs: a dataset that does not fit a model's inputs is refused in one line
naming both (the command-line cases are in tests/test_bad_input.py's table)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from mlflow.types import Schema, TensorSpec

from pipeline import input_specs
from pipeline.errors import ConfigError
from pipeline.input_specs import Spec


def multimodal_dataset(image_dtype: str = "uint8") -> tf.data.Dataset:
    inputs = {"image": np.zeros((4, 32, 32, 3), image_dtype), "features": np.zeros((4, 10), "float32")}
    return tf.data.Dataset.from_tensor_slices((inputs, np.zeros(4, "int64")))


def test_named_inputs_fit_by_name_and_a_wrong_dtype_is_named() -> None:
    image, features = keras.Input((32, 32, 3), dtype="uint8", name="image"), keras.Input((10,), name="features")
    model = keras.Model({"image": image, "features": features},
                        keras.layers.Dense(2)(keras.layers.Concatenate()([keras.layers.Flatten()(image), features])))
    taken = input_specs.of_keras(model)
    assert taken == {"image": Spec("uint8", (32, 32, 3)), "features": Spec("float32", (10,))}
    input_specs.require_fit(taken, input_specs.of_dataset(multimodal_dataset().element_spec), "m", "d", "inspect it")
    with pytest.raises(ConfigError) as error:
        input_specs.require_fit(taken, input_specs.of_dataset(multimodal_dataset("float32").element_spec),
                                "m", "d", "inspect it")
    assert str(error.value) == (
        "model m takes {features: float32 (-1, 10), image: uint8 (-1, 32, 32, 3)}, but dataset d gives "
        "{features: float32 (-1, 10), image: float32 (-1, 32, 32, 3)}: inspect it on data of its own input shape "
        "and dtype")


def test_a_signature_is_read_as_mlflow_enforces_it() -> None:
    single = Schema([TensorSpec(np.dtype("uint8"), (-1, 8, 8, 1))])
    assert input_specs.of_signature(single) == {"": Spec("uint8", (8, 8, 1))}
    named = Schema([TensorSpec(np.dtype("uint8"), (-1, 32, 32, 3), "image"),
                    TensorSpec(np.dtype("float32"), (-1, -1), "features")])
    assert input_specs.of_signature(named) == {"image": Spec("uint8", (32, 32, 3)),
                                               "features": Spec("float32", (None,))}
    assert input_specs.of_signature(None) is None  # a model logged without a signature: nothing to check
    input_specs.require_fit(None, {"": Spec("float32", (3,))}, "m", "d", "evaluate it")
    # A free dimension takes any size, but not another rank.
    assert Spec("float32", (None,)).accepts(Spec("float32", (10,)))
    assert not Spec("float32", (None,)).accepts(Spec("float32", (10, 1)))
    assert Spec("uint8", (32, 32, 3)).accepts(Spec("uint8", (None, None, 3)))  # sizes known only per image
    assert not Spec("uint8", (32, 32, 3)).accepts(Spec("uint8", (None, None, 1)))
