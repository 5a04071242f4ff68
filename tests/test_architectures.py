"""Every architecture in conf/architecture/, built from its own YAML: shapes, pinned size,
a training step, serialization round trips and the SavedModel export the pipeline logs."""

from __future__ import annotations

import functools
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, compose_config

from architectures import InputSpec
from architectures.common import nested_layers
from pipeline.config import validate
from pipeline.errors import ConfigError
from pipeline.tracking import registry
from pipeline.train import build_model, compile_args

DIGITS = InputSpec(shape=(8, 8, 1), dtype="uint8", num_classes=10)
CIFAR = InputSpec(shape=(32, 32, 3), dtype="uint8", num_classes=10)
MULTIMODAL = InputSpec(shape=(32, 32, 3), dtype="uint8", num_classes=0, features=10,
                       heads=(("binary", 2), ("category", 3)))
MULTIMODAL_SMALL = InputSpec(shape=(16, 16, 1), dtype="uint8", num_classes=0, features=4,
                             heads=(("binary", 2), ("category", 5)))

ARCHITECTURES = sorted(p.stem for p in (REPO / "conf" / "architecture").glob("*.yaml"))
SINGLE_INPUT = [name for name in ARCHITECTURES if name != "multi_io"]
# Keras's serialization registry after `import architectures`: every custom layer or model
# class, as "architectures>ClassName" (@keras.saving.register_keras_serializable(package="architectures")).
REGISTERED = sorted(name for name in keras.saving.get_custom_objects() if name.startswith("architectures>"))

# count_params() with the YAML defaults, per input spec. A change here is a change of
# architecture: update it deliberately.
PARAMETERS: dict[str, tuple[int, int]] = {
    "attention": (12_042, 26_378),
    "conditional": (9_610, 394_634),
    "custom_dense": (6_570, 199_082),
    "dynamic": (58_442, 828_490),
    "ensemble": (235_230, 2_930_398),
    "functional": (22_026, 599_562),
    # (8*8*512 + 512) + (512*256 + 256) + (256*10 + 10); with 32*32*3 inputs, 3072*512 + 512 first
    "mlp": (167_178, 1_707_274),
    "mlp_bn": (17_738, 402_762),
    "multi_io": (143_044, 44_390),
    "residual_mlp": (51_082, 440_266),
    "resnet": (309_418, 309_994),  # convolutions do not grow with the image; the 3-channel stem does
    "subclassed": (17_226, 402_250),
    "weighted_ensemble": (235_233, 2_930_401),  # the ensemble plus one logit per member
}


def specs_for(name: str) -> tuple[InputSpec, InputSpec]:
    return (MULTIMODAL, MULTIMODAL_SMALL) if name == "multi_io" else (DIGITS, CIFAR)


def build(name: str, spec: InputSpec) -> keras.Model:
    cfg = compose_config([f"architecture={name}"])
    validate(cfg)
    return build_model(cfg, spec)


def batch(spec: InputSpec, n: int = 8, seed: int = 0):
    """Random raw inputs and labels shaped like the dataset's elements."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *spec.shape), dtype=np.uint8)
    if not spec.multimodal:
        return images, rng.integers(0, spec.num_classes, size=n)
    inputs = {"image": images, "features": rng.standard_normal((n, spec.features)).astype(np.float32)}
    return inputs, {name: rng.integers(0, classes, size=n) for name, classes in spec.heads}


def as_dict(outputs) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in outputs.items()} if isinstance(outputs, dict) else {"out": np.asarray(outputs)}


def assert_same_predictions(a, b, **tolerance) -> None:
    a, b = as_dict(a), as_dict(b)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], **tolerance)


def test_every_family_of_the_tutorial_is_configured() -> None:
    assert set(ARCHITECTURES) == {
        "mlp", "mlp_bn", "functional", "residual_mlp", "custom_dense", "attention", "subclassed",
        "resnet", "dynamic", "conditional", "ensemble", "weighted_ensemble", "multi_io",
    }


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_builds_for_two_input_specs_with_pinned_size(name: str) -> None:
    counts = []
    for spec in specs_for(name):
        model = build(name, spec)
        inputs, _ = batch(spec)
        outputs = as_dict(model(inputs, training=False))
        for head, probabilities in outputs.items():
            assert probabilities.dtype == np.float32, head
            assert np.all(np.isfinite(probabilities)) and np.all((probabilities >= 0) & (probabilities <= 1))
        if not spec.multimodal:
            assert outputs["out"].shape == (8, spec.num_classes)
            np.testing.assert_allclose(outputs["out"].sum(axis=1), 1.0, rtol=1e-5)
        else:
            assert {h: o.shape for h, o in outputs.items()} == {
                h: (8, 1 if c == 2 else c) for h, c in spec.heads}
        counts.append(model.count_params())
    assert tuple(counts) == PARAMETERS[name]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_one_training_step_is_finite_and_moves_every_weight(name: str) -> None:
    keras.utils.set_random_seed(0)
    spec = specs_for(name)[0]
    model = build(name, spec)
    cfg = compose_config([f"architecture={name}"])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), **compile_args(cfg.architecture))
    before = [w.numpy().copy() for w in model.trainable_weights]
    inputs, labels = batch(spec, n=32)
    logs = model.train_on_batch(inputs, labels, return_dict=True)
    assert all(np.isfinite(v) for v in logs.values()), logs
    unchanged = [w.path for w, old in zip(model.trainable_weights, before) if np.array_equal(w.numpy(), old)]
    assert not unchanged


@pytest.mark.parametrize("name", SINGLE_INPUT)
def test_output_stays_float32_under_mixed_precision(name: str) -> None:
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = build(name, DIGITS)
        assert model(batch(DIGITS)[0]).dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


@functools.cache
def custom_layers() -> dict[type, keras.layers.Layer]:
    """One instance of each of this project's own layer and model classes the architectures build."""
    found: dict[type, keras.layers.Layer] = {}
    for name in ARCHITECTURES:
        model = build(name, specs_for(name)[0])
        for layer in [model, *nested_layers(model)]:
            if type(layer).__module__.startswith("architectures."):
                found.setdefault(type(layer), layer)
    return found


def test_custom_classes_are_registered_and_used() -> None:
    assert REGISTERED, "`import architectures` registered no class with keras.saving.register_keras_serializable"
    unused = [name for name in REGISTERED if keras.saving.get_registered_object(name) not in custom_layers()]
    assert not unused, f"registered, but no architecture in conf/architecture/ builds them: {unused}"
    unregistered = [cls.__qualname__ for cls in custom_layers()
                    if keras.saving.get_registered_name(cls) not in REGISTERED]
    assert not unregistered, f"built, but not registered serializable (their .keras files cannot load): {unregistered}"


@pytest.mark.parametrize("registered_name", REGISTERED)
def test_registered_class_round_trips_its_config(registered_name: str) -> None:
    cls = keras.saving.get_registered_object(registered_name)
    layer = custom_layers().get(cls)
    assert layer is not None, f"no architecture builds {registered_name}"
    clone = cls.from_config(layer.get_config())
    assert type(clone) is cls and clone.get_config() == layer.get_config()
    # Through Keras's own serialization, as a .keras file stores it: the registered name leads back here.
    config = keras.saving.serialize_keras_object(layer)
    assert config["registered_name"] == registered_name
    assert keras.saving.deserialize_keras_object(config).get_config() == layer.get_config()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_keras_file_round_trip(name: str, tmp_path: Path) -> None:
    spec = specs_for(name)[0]
    model = build(name, spec)
    model.save(tmp_path / f"{name}.keras")
    reloaded = keras.models.load_model(tmp_path / f"{name}.keras")
    inputs, _ = batch(spec)
    assert_same_predictions(model.predict(inputs, verbose=0), reloaded.predict(inputs, verbose=0), rtol=1e-6)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_logged_saved_model_reloads_with_plain_tensorflow(name: str, tmp_path: Path, mlflow_store: str) -> None:
    """The exact export the pipeline logs, reloaded with `tf.saved_model.load`."""
    spec = specs_for(name)[0]
    model = build(name, spec)
    with mlflow.start_run():
        info = registry.log_saved_model(model, spec, registered_model_name=None)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
    saved_model = next(p.parent for p in local.rglob("saved_model.pb"))
    loaded = tf.saved_model.load(str(saved_model))  # keep it: `serve` alone does not own the variables
    inputs, _ = batch(spec)
    assert_same_predictions(model.predict(inputs, verbose=0), loaded.serve(inputs), rtol=1e-5, atol=1e-6)


def test_multi_io_on_an_image_only_dataset_is_a_config_error() -> None:
    cfg = compose_config(["architecture=multi_io"])
    with pytest.raises(ConfigError) as error:
        build_model(cfg, DIGITS)
    assert str(error.value).startswith(
        "architecture=multi_io with dataset=digits: multi_io needs a dataset with image and numeric "
        "`features` inputs and named labels, e.g. dataset=synthetic_multimodal."
    )


def test_image_only_architecture_on_a_multimodal_dataset_is_a_config_error() -> None:
    cfg = compose_config(["architecture=resnet", "dataset=synthetic_multimodal"])
    with pytest.raises(ConfigError, match=r"^architecture=resnet takes images only, but "
                       r"dataset=synthetic_multimodal has image and features inputs and labels "
                       r"\['binary', 'category'\]: use architecture=multi_io$"):
        build_model(cfg, MULTIMODAL)


def test_conditional_branches_differ_and_both_train() -> None:
    models = {}
    for branch in ["relu", "tanh"]:
        cfg = compose_config(["architecture=conditional", f"architecture.branch={branch}"])
        models[branch] = build_model(cfg, DIGITS)
        models[branch].compile(optimizer="adam", **compile_args(cfg.architecture))
        logs = models[branch].train_on_batch(*batch(DIGITS, n=32), return_dict=True)
        assert np.isfinite(logs["loss"])
    assert models["relu"].get_layer("relu_dense").units == 128
    assert models["tanh"].get_layer("tanh_dense").units == 64
    assert (models["relu"].count_params(), models["tanh"].count_params()) == (9_610, 4_810)
