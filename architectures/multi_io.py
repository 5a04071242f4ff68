"""`multi_io`: an image and a numeric feature vector in, one output head per label out.

    image (B, H, W, C) uint8 -> Rescale -> [Conv 3x3 relu -> MaxPool] x len(conv_filters)
                             -> Flatten -> Dense image_units relu        \\
                                                                          Concatenate -> Dense shared_units relu
    features (B, F) float32  -> Dense feature_units relu                 /   -> Dropout -> heads

A head with 2 classes is a 1-unit sigmoid (e.g. `binary`), a head with more is a softmax
(e.g. `category`, 3 classes). Inputs and outputs are dicts keyed by name, matching the
dataset's `({"image", "features"}, {label: ...})` elements. Losses, loss weights and
metrics per head come from the `compile` block of `conf/architecture/multi_io.yaml`.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from architectures.common import InputSpec, check_dropout, check_units, image_input

# Takes a multimodal InputSpec (image + `features`, named `heads`); the pipeline refuses
# to pair a multimodal dataset with any architecture module that does not say so.
MULTIMODAL = True


def build(
    input_spec: InputSpec,
    *,
    conv_filters: Sequence[int] = (16, 32),
    image_units: int = 64,
    feature_units: int = 32,
    shared_units: int = 64,
    dropout: float = 0.2,
) -> keras.Model:
    """Build the two-input, multi-head Functional model.

    Args:
        input_spec: a multimodal spec: image shape and dtype, `features` length and the
            `heads` (label name, classes) to predict.
        conv_filters: filters of each conv + max-pool stage of the image branch.
        image_units: width of the Dense layer closing the image branch.
        feature_units: width of the Dense layer over the numeric features.
        shared_units: width of the Dense layer over both branches.
        dropout: rate of the Dropout before the heads, in [0, 1).

    Returns:
        An uncompiled `keras.Model` mapping {"image", "features"} to {head: float32
        probabilities}, (B, 1) for binary heads and (B, classes) otherwise.
    """
    if input_spec.features < 1 or not input_spec.heads:
        raise ValueError(
            "multi_io needs a dataset with image and numeric `features` inputs and named labels, "
            f"e.g. dataset=synthetic_multimodal. Received: images of shape {input_spec.shape} only"
        )
    check_units(conv_filters, "conv_filters")
    check_units([image_units, feature_units, shared_units], "image_units, feature_units and shared_units")
    check_dropout(dropout)

    image, x = image_input(input_spec)
    for stage, filters in enumerate(conv_filters, start=1):
        x = keras.layers.Conv2D(int(filters), 3, padding="same", activation="relu", name=f"conv_{stage}")(x)
        # Max-pool only while the map is large enough; flattening keeps where things are.
        if min(x.shape[1:3]) >= 2:
            x = keras.layers.MaxPooling2D(name=f"pool_{stage}")(x)
    x = keras.layers.Flatten(name="image_flatten")(x)
    x = keras.layers.Dense(image_units, activation="relu", name="image_dense")(x)

    features = keras.Input(shape=(input_spec.features,), dtype="float32", name="features")
    f = keras.layers.Dense(feature_units, activation="relu", name="features_dense")(features)

    shared = keras.layers.Concatenate(name="concat")([x, f])
    shared = keras.layers.Dense(shared_units, activation="relu", name="shared_dense")(shared)
    shared = keras.layers.Dropout(dropout, name="shared_dropout")(shared)
    outputs = {
        name: keras.layers.Dense(
            1 if classes == 2 else classes,
            activation="sigmoid" if classes == 2 else "softmax",
            dtype="float32",  # float32 probabilities under any precision policy
            name=name,
        )(shared)
        for name, classes in input_spec.heads
    }
    return keras.Model(inputs={"image": image, "features": features}, outputs=outputs, name="multi_io")
