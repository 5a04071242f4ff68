"""pipeline.inspect on a real Keras model logged to a real MLflow store, read on real digits."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import compose_config, run_module
from mlflow.tracking import MlflowClient

from architectures import InputSpec, ensemble, mlp, subclassed
from pipeline.errors import ConfigError
from pipeline.figures.activations import intermediate_model, layer_names, layer_statistics
from pipeline.inspect import inspect_model, load_keras_model

DIGITS = InputSpec(shape=(8, 8, 1), dtype="uint8", num_classes=10)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def logged_model(mlflow_store: str, tmp_path: Path) -> tuple[str, keras.Model]:
    """A small mlp saved as `keras/model.keras` of a finished run, as training logs it."""
    keras.utils.set_random_seed(3)
    model = mlp.build(DIGITS, hidden_units=[32, 16])
    (tmp_path / "local").mkdir()
    model.save(tmp_path / "local" / "model.keras")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp_path / "local" / "model.keras"), artifact_path="keras")
    return run.info.run_id, model


def digits_batch(tfds_dir: str, examples: int) -> np.ndarray:
    """The first `examples` raw test images, read independently of pipeline.inspect."""
    split = tfds.builder("digits", data_dir=tfds_dir).as_dataset(split="test", as_supervised=True,
                                                                 shuffle_files=False)
    images, _ = next(iter(tfds.as_numpy(split.take(examples).batch(examples))))
    return images


def expected_dense_1(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """relu(rescaled images @ W + b), in NumPy from the model's own weights."""
    kernel, bias = model.get_layer("dense_1").get_weights()
    return np.maximum(images.reshape(len(images), -1).astype(np.float64) / 255.0 @ kernel + bias, 0.0)


def assert_matches_numpy(stats: dict, values: np.ndarray) -> None:
    assert stats["shape"] == list(values.shape)
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-4)
    assert stats["std"] == pytest.approx(values.std(), rel=1e-4)
    assert stats["min"] == pytest.approx(values.min(), abs=1e-6)
    assert stats["max"] == pytest.approx(values.max(), rel=1e-4)
    assert stats["zero_fraction"] == pytest.approx(np.mean(values == 0), abs=1e-9)
    assert stats["non_finite"] == 0


def test_inspect_in_process_matches_numpy(logged_model, tfds_dir: str, tmp_path: Path) -> None:
    run_id, model = logged_model
    out = tmp_path / "out"
    cfg = compose_config([f"model=runs:/{run_id}", "layers=[dense_1,probabilities]", "examples=40",
                          f"dataset.data_dir={tfds_dir}", f"output_dir={out}"], config_name="inspect")
    statistics = inspect_model(cfg)

    assert list(statistics) == ["dense_1", "probabilities"]
    images = digits_batch(tfds_dir, 40)
    dense_1 = expected_dense_1(model, images)
    assert dense_1.shape == (40, 32)
    assert_matches_numpy(statistics["dense_1"], dense_1)
    assert statistics["dense_1"]["dtype"] == "float32"
    assert 0 < statistics["dense_1"]["zero_fraction"] < 1, "relu zeroes some units, not all"
    probabilities = model.predict(images, verbose=0)
    assert_matches_numpy(statistics["probabilities"], probabilities.astype(np.float64))
    assert statistics["probabilities"]["mean"] == pytest.approx(0.1, abs=1e-6), "each row sums to 1"

    for name in ["dense_1", "probabilities"]:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000
    assert json.loads((out / "statistics.json").read_text()) == statistics


def test_inspect_command_line_every_layer(logged_model, mlflow_store: str, tfds_dir: str, tmp_path: Path) -> None:
    run_id, model = logged_model
    out = tmp_path / "cli_out"
    result = run_module("pipeline.inspect", f"model=runs:/{run_id}/keras/model.keras", "examples=16",
                        f"dataset.data_dir={tfds_dir}", f"output_dir={out}", cwd=tmp_path,
                        env={"MLFLOW_TRACKING_URI": mlflow_store, "TF_CPP_MIN_LOG_LEVEL": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # 16 examples of a split TFDS caches: read in part, the cache used to be discarded with
    # "The calling iterator did not fully read the dataset being cached" on every run.
    assert "did not fully read the dataset being cached" not in result.stderr, result.stderr
    assert "cuInit" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"runs:/{run_id}/keras/model.keras on digits[test], 16 examples:"
    assert lines[1].split() == ["layer", "shape", "dtype", "mean", "std", "min", "max", "zeros", "non-finite"]
    every_layer = ["rescale", "flatten", "dense_1", "dropout_1", "dense_2", "dropout_2", "probabilities"]
    assert [line.split()[0] for line in lines[2:9]] == every_layer
    assert lines[9] == f"histograms of 7 layers and statistics.json in {out}"
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(every_layer)

    statistics = json.loads((out / "statistics.json").read_text())
    dense_1 = expected_dense_1(model, digits_batch(tfds_dir, 16))
    assert_matches_numpy(statistics["dense_1"], dense_1)
    row = lines[2 + every_layer.index("dense_1")].split()
    assert row[1:4] == ["(16,", "32)", "float32"]
    assert float(row[4]) == pytest.approx(dense_1.mean(), rel=1e-3)
    # Dropout is off at inference: its output is its input.
    assert statistics["dropout_1"] == statistics["dense_1"] | {"layer": "dropout_1"}
    # The job's log keeps what was printed (once on the console: stdout is the report alone).
    [log_file] = tmp_path.glob("outputs/inspect/*/*/inspect.log")
    logged = log_file.read_text()
    assert "[pipeline.inspect.report][INFO] - " + lines[0] in logged
    assert all(line in logged for line in lines), logged
    assert len(lines) == 10, result.stdout


def test_registered_models_are_refused_naming_the_training_run(logged_model, tfds_dir: str) -> None:
    run_id, _ = logged_model
    client = MlflowClient()
    client.create_registered_model("digits-mlp")
    version = client.create_model_version("digits-mlp", source=f"runs:/{run_id}/model", run_id=run_id).version
    client.set_registered_model_alias("digits-mlp", "champion", version)

    cfg = compose_config(["model=models:/digits-mlp@champion", f"dataset.data_dir={tfds_dir}"], config_name="inspect")
    with pytest.raises(ConfigError) as error:
        inspect_model(cfg)
    assert str(error.value) == (
        "model: models:/digits-mlp@champion is a registered SavedModel, which keeps no Keras layers to inspect; "
        f"give its training run instead: model=runs:/{run_id}"
    )
    assert error.value.exit_code == 2, "pipeline.cli prints it as one `error:` line and exits 2"
    with pytest.raises(ConfigError, match=rf"models:/digits-mlp/{version} is a registered SavedModel.*runs:/{run_id}$"):
        load_keras_model(f"models:/digits-mlp/{version}")
    with pytest.raises(ConfigError, match=r"models:/nothing/3 is a registered SavedModel.*model=runs:/RUN_ID$"):
        load_keras_model("models:/nothing/3")


def test_saved_model_directory_and_missing_artifact_are_refused(logged_model, tmp_path: Path) -> None:
    run_id, model = logged_model
    model.export(str(tmp_path / "exported"), verbose=False)
    with pytest.raises(ConfigError, match=r"exported is a SavedModel, which keeps no Keras layers.*runs:/RUN_ID"):
        load_keras_model(str(tmp_path / "exported"))
    with pytest.raises(Exception, match=rf"model: cannot download runs:/{run_id}/nope/model.keras"):
        load_keras_model(f"runs:/{run_id}/nope/model.keras")


def test_unknown_layer_lists_the_available_ones(tfds_dir: str, tmp_path: Path) -> None:
    mlp.build(DIGITS, hidden_units=[8]).save(tmp_path / "m.keras")
    cfg = compose_config([f"model={tmp_path / 'm.keras'}", "layers=[dense_1,dense_9]", f"dataset.data_dir={tfds_dir}",
                          f"output_dir={tmp_path}"], config_name="inspect")
    with pytest.raises(ConfigError) as error:
        inspect_model(cfg)
    assert str(error.value) == ("layers: dense_9 is not a layer of mlp. Available: rescale, flatten, dense_1, "
                                "dropout_1, probabilities")


def test_subclassed_model_is_refused(tfds_dir: str, tmp_path: Path) -> None:
    model = subclassed.build(DIGITS, hidden_units=[8])
    model(np.zeros((1, 8, 8, 1), np.uint8))
    model.save(tmp_path / "s.keras")
    cfg = compose_config([f"model={tmp_path / 's.keras'}", f"dataset.data_dir={tfds_dir}"], config_name="inspect")
    with pytest.raises(ConfigError, match="layers: subclassed is a subclassed SubclassedMLP: its layers have no "
                                          "symbolic outputs to read"):
        inspect_model(cfg)


def test_intermediate_model_reads_layers_inside_ensemble_members(tmp_path: Path) -> None:
    keras.utils.set_random_seed(5)
    model = ensemble.build(DIGITS, members=["mlp", "functional"])
    model.save(tmp_path / "ensemble.keras")
    reloaded = keras.saving.load_model(tmp_path / "ensemble.keras", compile=False)  # nested graphs rebuilt
    names = layer_names(reloaded)
    assert names[:3] == ["mlp", "mlp/rescale", "mlp/flatten"] and names[-1] == "probabilities"
    assert "functional/concat" in names

    images = np.random.default_rng(0).integers(0, 256, size=(6, 8, 8, 1), dtype=np.uint8)
    outputs = intermediate_model(reloaded, ["mlp/dense_1", "functional/probabilities", "mlp", "probabilities"]) \
        .predict(images, verbose=0)
    np.testing.assert_allclose(outputs["mlp/dense_1"], expected_dense_1(reloaded.get_layer("mlp"), images),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs["functional/probabilities"],
                               reloaded.get_layer("functional").predict(images, verbose=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose((outputs["mlp"] + outputs["functional/probabilities"]) / 2, outputs["probabilities"],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(outputs["probabilities"], model.predict(images, verbose=0), rtol=1e-5, atol=1e-7)


def test_layer_statistics_skip_non_finite_values() -> None:
    values = np.array([[0.0, 1.0, np.inf], [3.0, np.nan, 0.0]], dtype=np.float32)
    stats = layer_statistics("dense_1", values)
    finite = np.array([0.0, 1.0, 3.0, 0.0])
    assert stats == {"layer": "dense_1", "shape": [2, 3], "dtype": "float32", "mean": finite.mean(),
                     "std": pytest.approx(finite.std()), "min": 0.0, "max": 3.0, "zero_fraction": pytest.approx(2 / 6),
                     "non_finite": 2}
    nothing_finite = layer_statistics("x", np.full(3, np.nan))
    assert np.isnan(nothing_finite["mean"]) and nothing_finite["non_finite"] == 3
