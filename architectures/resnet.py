"""`resnet`: the tutorial's MiniResNet, a small residual convolutional network.

Rescale -> Conv 3x3 -> BatchNorm -> relu (-> MaxPool 2x2 on inputs of side >= 16)
-> residual blocks of 32, 64 (stride 2) and 128 (stride 2) filters
-> GlobalAveragePooling -> Dropout -> softmax.

Every convolution pads "same", so even 8x8 digits keep a spatial extent of at least
1 after the strided blocks (8 -> 8 -> 4 -> 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from architectures.common import (
    InputSpec,
    check_dropout,
    check_positive_int,
    check_units,
    classifier_head,
    image_input,
)

# Pooling in the stem would shrink 8x8 digits to 4x4 before any residual block; only
# inputs at least this large (MNIST 28, CIFAR 32) are pooled.
MIN_SIDE_TO_POOL = 16


def residual_block(x: keras.KerasTensor, filters: int, stride: int, momentum: float, name: str) -> keras.KerasTensor:
    """conv-BN-relu-conv-BN plus a shortcut, added, then relu.

    The shortcut is the identity when the shape is unchanged, otherwise a 1x1 strided
    convolution + BatchNorm projecting (B, H, W, C_in) to (B, H/stride, W/stride, filters).
    """
    # No conv bias before BatchNorm: its shift would be cancelled by BN's own beta.
    y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv_1")(x)
    y = keras.layers.BatchNormalization(momentum=momentum, name=f"{name}_bn_1")(y)
    y = keras.layers.Activation("relu", name=f"{name}_relu_1")(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv_2")(y)
    y = keras.layers.BatchNormalization(momentum=momentum, name=f"{name}_bn_2")(y)  # (B, H/stride, W/stride, filters)

    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, padding="same", use_bias=False,
                                       name=f"{name}_projection")(x)
        shortcut = keras.layers.BatchNormalization(momentum=momentum, name=f"{name}_projection_bn")(shortcut)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.Activation("relu", name=f"{name}_relu_2")(y)


def build(
    input_spec: InputSpec,
    *,
    filters: Sequence[int] = (32, 64, 128),
    stem_filters: int = 32,
    dropout: float = 0.0,
    batch_norm_momentum: float = 0.9,
) -> keras.Model:
    """Build the MiniResNet.

    Args:
        input_spec: image shape (H, W, C), raw dtype and class count of the dataset.
        filters: filters of each residual block; every block after the first halves
            the spatial size (stride 2).
        stem_filters: filters of the stem convolution.
        dropout: rate of the Dropout between global pooling and the head, in [0, 1).
        batch_norm_momentum: momentum of every BatchNorm's moving mean and variance,
            the statistics used at inference, in [0, 1).

    Returns:
        An uncompiled Functional `keras.Model` mapping raw images (B, H, W, C) to
        float32 class probabilities (B, num_classes).
    """
    check_units(filters, "filters")
    check_positive_int(stem_filters, "stem_filters")
    check_dropout(dropout)
    if not 0.0 <= batch_norm_momentum < 1.0:
        raise ValueError(f"batch_norm_momentum must be in [0, 1). Received: {batch_norm_momentum}")
    if len(input_spec.shape) != 3:
        raise ValueError(f"resnet needs images of shape (H, W, C). Received: {input_spec.shape}")

    inputs, x = image_input(input_spec)  # (B, H, W, C) in [0, 1]
    x = keras.layers.Conv2D(int(stem_filters), 3, padding="same", use_bias=False, name="stem_conv")(x)
    x = keras.layers.BatchNormalization(momentum=batch_norm_momentum, name="stem_bn")(x)
    x = keras.layers.Activation("relu", name="stem_relu")(x)  # (B, H, W, stem_filters)
    if min(input_spec.shape[:2]) >= MIN_SIDE_TO_POOL:
        x = keras.layers.MaxPooling2D(2, padding="same", name="stem_pool")(x)  # (B, H/2, W/2, stem_filters)
    for index, block_filters in enumerate(filters, start=1):
        x = residual_block(x, int(block_filters), stride=1 if index == 1 else 2,
                           momentum=batch_norm_momentum, name=f"block_{index}")
    x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)  # (B, filters[-1])
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = classifier_head(input_spec.num_classes)(x)
    return keras.Model(inputs, outputs, name="resnet")
