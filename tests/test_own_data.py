"""The user's own data: a folder of images and a CSV table, read, split, cached and
refused as the issue asks; a TFDS dataset by name; and, end to end, each trained,
registered, reloaded by a process that cannot import this project, and predicted on
with `pipeline.predict`.

The folders and tables are made here (tests/own_data.py): PNG, JPEG, BMP and GIF files
of odd sizes in grayscale, RGB, RGBA and palette layouts, one corrupt file and one that
is no image; scikit-learn's wine, iris and breast-cancer tables with string labels, an
id column, a categorical column and a missing cell.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from conftest import compose_config, compose_plan, reload_without_project
from mlflow.tracking import MlflowClient
from own_data import DIGIT_CLASSES, make_image_folder, write_table

from pipeline import data, predict
from pipeline.datasets import tfds_dataset
from pipeline.datasets.csv_table import CsvTable
from pipeline.datasets.image_folder import ImageFolder
from pipeline.errors import ConfigError, DatasetError
from pipeline.evaluate import evaluate
from pipeline.train import build_model, train

CLASSES = tuple(sorted(DIGIT_CLASSES))  # ("one", "seven", "zero"): folder names, in output order


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 3 x 24 images in every format and layout, plus broken.jpg and notes.txt."""
    return make_image_folder(tmp_path_factory.mktemp("own") / "photos", per_class=24)


def arrays(ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    images, labels = next(iter(ds.batch(100_000)))
    return images.numpy(), labels.numpy()


# -- image folders ---------------------------------------------------------------------
def test_every_format_and_layout_decodes_to_one_shape(photos: Path) -> None:
    examples = ImageFolder(str(photos), image_size=[16, 16], on_bad_file="skip").read("memory")
    assert examples.class_names == CLASSES
    assert sum(examples.sizes.values()) == 3 * 24, "every image but broken.jpg; notes.txt is no image"
    assert examples.skipped == ("zero/broken.jpg",)
    assert examples.input_spec.shape == (16, 16, 3) and examples.input_spec.dtype == "uint8"
    images, labels = arrays(examples.roles["train"])
    assert images.dtype == np.uint8 and images.shape[1:] == (16, 16, 3)
    assert set(labels.tolist()) <= {0, 1, 2}
    gray = ImageFolder(str(photos), image_size=[16, 16], channels=1, on_bad_file="skip").read("memory")
    assert arrays(gray.roles["train"])[0].shape[1:] == (16, 16, 1)


def test_a_grayscale_image_becomes_rgb_with_equal_channels(tmp_path: Path) -> None:
    from PIL import Image

    for name, value in (("dark", 40), ("light", 220)):
        for index, split in enumerate(("train", "test")):
            (tmp_path / split / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((9, 7), value + index, np.uint8), mode="L").save(tmp_path / split / name / "a.png")
    examples = ImageFolder(str(tmp_path), val_fraction=0.0).read("memory")
    images = np.concatenate([arrays(examples.roles[role])[0] for role in ("train", "test")])
    assert examples.input_spec.shape == (9, 7, 3), "the size all images share"
    np.testing.assert_array_equal(images[..., 0], images[..., 1])
    np.testing.assert_array_equal(images[..., 1], images[..., 2])
    assert set(np.unique(images).tolist()) == {40, 41, 220, 221}, "no resize, no rounding: the pixels as stored"


def test_a_corrupt_file_is_one_line_naming_it_and_the_flag(photos: Path) -> None:
    with pytest.raises(DatasetError) as error:
        ImageFolder(str(photos), image_size=[16, 16]).read("memory")
    message = str(error.value)
    assert "\n" not in message
    assert "1 of 73 image files cannot be decoded (zero/broken.jpg)" in message
    assert "dataset.on_bad_file=skip" in message


def test_the_decoders_own_complaints_are_not_printed(photos: Path, capfd) -> None:
    # libjpeg writes "Input file read error" (and its like) straight to stderr for a
    # corrupt JPEG: the error names the file instead, in one line.
    from pipeline.datasets import images

    with pytest.raises(tf.errors.InvalidArgumentError):
        images.load(tf.constant(str(photos / "zero" / "broken.jpg")), (8, 8), 3)
    assert "Input file read error" in capfd.readouterr().err, "what the decoder says unfiltered"
    with pytest.raises(DatasetError, match="cannot be decoded"):
        ImageFolder(str(photos), image_size=[16, 16]).read("memory")
    printed = capfd.readouterr().err
    assert "Input file read error" not in printed and "JPEG" not in printed, printed


def test_files_without_an_image_extension_are_counted_at_info(photos: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="pipeline.datasets.image_folder"):
        ImageFolder(str(photos), image_size=[16, 16], on_bad_file="skip").read("none")
    assert any("ignored 1 file without an image extension" in r.getMessage() and "zero/notes.txt" in r.getMessage()
               for r in caplog.records)


def test_differing_sizes_need_image_size(photos: Path) -> None:
    with pytest.raises(DatasetError, match=r"^dataset.image_size is needed: the images differ in size \(\d+x\d+ "
                                           r".*set e.g. dataset.image_size=\[\d+,\d+\]$"):
        ImageFolder(str(photos), on_bad_file="skip").read("memory")


def test_adding_images_moves_none_between_splits(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "photos", per_class=30, bad_file=False)
    before, _, _ = ImageFolder(str(folder)).list_files()
    role_of = {f.relative: role for role, files in before.items() for f in files}
    assert {role: len(files) for role, files in before.items()}.keys() == {"train", "val", "test"}
    make_image_folder(tmp_path / "more", per_class=45, bad_file=False)  # 15 new images per class
    for path in (tmp_path / "more").rglob("*.*"):
        target = folder / path.relative_to(tmp_path / "more")
        if not target.exists():
            shutil.copy(path, target)
    after, _, _ = ImageFolder(str(folder)).list_files()
    moved = [f.relative for role, files in after.items() for f in files
             if f.relative in role_of and role_of[f.relative] != role]
    assert len([f for files in after.values() for f in files]) == 3 * 45 and moved == []


def test_split_folders_are_the_splits(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "photos", per_class=20, splits=True, bad_file=False)
    files, classes, _ = ImageFolder(str(folder), val_fraction=0.25).list_files()
    assert classes == CLASSES
    assert {f.relative.split("/")[0] for f in files["test"]} == {"test"}
    assert {f.relative.split("/")[0] for f in files["train"] + files["val"]} == {"train"}
    assert len(files["test"]) == len(list((folder / "test").rglob("*.*")))
    assert 0 < len(files["val"]) < len(files["train"]), "validation from train, by val_fraction"


def test_cache_modes_give_the_same_examples_and_disk_is_reused(photos: Path, tmp_path: Path, caplog) -> None:
    folder = ImageFolder(str(photos), image_size=[12, 12], on_bad_file="skip", data_dir=str(tmp_path))
    memory = arrays(folder.read("memory").roles["train"])
    none = arrays(folder.read("none").roles["train"])
    disk = arrays(folder.read("disk").roles["train"])
    for other in (none, disk):
        np.testing.assert_array_equal(memory[0], other[0])
        np.testing.assert_array_equal(memory[1], other[1])
    (cache,) = (tmp_path / "image_folder").iterdir()
    assert cache.name.startswith("photos-") and (cache / "manifest.json").exists()
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(".")], "no staging folder left"
    with caplog.at_level(logging.INFO, logger="pipeline.datasets.image_folder"):
        again = arrays(ImageFolder(str(photos), image_size=[12, 12], on_bad_file="skip",
                                   data_dir=str(tmp_path)).read("disk").roles["train"])
    assert any("reading decoded images from" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(again[0], memory[0])


def test_a_disk_cache_of_a_folder_with_bad_files_is_not_kept(photos: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot be decoded"):
        ImageFolder(str(photos), image_size=[12, 12], data_dir=str(tmp_path)).read("disk")
    assert list((tmp_path / "image_folder").iterdir()) == [], "the user fixes the folder: nothing stale stays"


def test_the_digest_follows_the_files_not_where_they_lie(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "a" / "photos", per_class=8, bad_file=False)
    digest = ImageFolder(str(folder), image_size=[8, 8]).read("none").lineage.digest
    shutil.copytree(folder, tmp_path / "b" / "photos", copy_function=shutil.copy2)  # keeps mtimes
    assert ImageFolder(str(tmp_path / "b" / "photos"), image_size=[8, 8]).read("none").lineage.digest == digest
    first = next(folder.rglob("*.png"))
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    assert ImageFolder(str(folder), image_size=[8, 8]).read("none").lineage.digest != digest


# -- tables ------------------------------------------------------------------------------
def test_a_table_becomes_raw_columns_with_statistics_of_train(tmp_path: Path) -> None:
    path = write_table(tmp_path / "wine.csv")
    table = CsvTable(str(path), label="species", drop=["id"], on_missing="drop").read("memory")
    assert table.class_names == ("class_0", "class_1", "class_2")
    assert sum(table.sizes.values()) == 177, "the row with the missing cell dropped"
    columns = {column.name: column for column in table.input_spec.columns}
    assert "id" not in columns and "species" not in columns
    assert columns["batch"].dtype == "string" and columns["batch"].vocabulary == ("east", "north", "south")
    assert columns["alcohol"].dtype == "float32" and 11 < columns["alcohol"].mean < 15
    assert columns["od280/od315_of_diluted_wines"].key == "od280_od315_of_diluted_wines"
    assert table.input_spec.shape == (13 + 4,), "13 numbers, 3 categories + 1 unseen slot"
    inputs, labels = next(iter(table.roles["train"].batch(1000)))
    assert inputs["batch"].dtype == tf.string and inputs["alcohol"].shape[1:] == (1,)
    assert set(labels.numpy().tolist()) == {0, 1, 2}


@pytest.mark.parametrize("cell, said", [("", "missing value"), ("abc", "'abc' is not a number")])
def test_a_bad_cell_is_one_line_naming_its_line_and_column(tmp_path: Path, cell: str, said: str) -> None:
    path = write_table(tmp_path / "iris.csv", "iris", missing_cell=False)
    lines = path.read_text().splitlines()
    cells = lines[4].split(",")
    cells[2] = cell
    lines[4] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as error:
        CsvTable(str(path), label="species", drop=["id"]).read("memory")
    assert str(error.value) == (f"dataset 'iris': iris.csv line 5, column 'sepal_width_(cm)': {said}; fix the file, "
                                "or set dataset.on_missing=drop to drop such rows")


def test_integer_labels_keep_their_numeric_order(tmp_path: Path) -> None:
    path = tmp_path / "counts.csv"
    rows = [(float(i), str(i % 11)) for i in range(220)]
    path.write_text("x,label\n" + "".join(f"{x},{y}\n" for x, y in rows))
    assert CsvTable(str(path), label="label").read("memory").class_names == tuple(str(i) for i in range(11))


def test_a_table_model_takes_raw_columns_and_an_image_family_is_refused(tmp_path: Path) -> None:
    path = write_table(tmp_path / "wine.csv", missing_cell=False)
    cfg = compose_config(["dataset=csv", f"dataset.path={path}", "dataset.label=species", "dataset.drop=[id]"])
    table = data.reader(cfg.dataset).read("memory")
    model = build_model(cfg, table.input_spec, "mlp")
    inputs, _ = next(iter(table.roles["test"].batch(4)))
    probabilities = model(inputs).numpy()
    assert probabilities.shape == (4, 3) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert {layer.name for layer in model.layers} >= {"standardize", "one_hot_batch", "mlp"}
    with pytest.raises(ConfigError, match=r"^architecture=resnet takes images, but dataset=wine is a table: use one of "
                                          r"conditional, custom_dense, .*mlp, mlp_bn, residual_mlp"):
        build_model(compose_config(["architecture=resnet", *cfg_overrides(cfg)]), table.input_spec, "resnet")


def cfg_overrides(cfg) -> list[str]:
    return ["dataset=csv", f"dataset.path={cfg.dataset.path}", "dataset.label=species", "dataset.drop=[id]"]


# -- TFDS by name ------------------------------------------------------------------------
def test_any_prepared_tfds_dataset_by_name(tfds_dir: str) -> None:
    cfg = compose_config(["dataset=tfds", "dataset.name=digits", f"dataset.data_dir={tfds_dir}",
                          "dataset.image_size=[16,16]"])
    splits = data.load(cfg.dataset, seed=0)
    assert splits.input_spec.shape == (16, 16, 1) and splits.class_names == tuple(str(i) for i in range(10))
    images, _ = next(iter(splits.test))
    assert images.shape[1:] == (16, 16, 1) and images.dtype == tf.uint8
    assert data.command_overrides(cfg.dataset) == [f"dataset.data_dir={tfds_dir}", "dataset.image_size=[16,16]"], \
        "digits is the default dataset, and its preset"


def info(features: dict, supervised_keys=None) -> types.SimpleNamespace:
    """What `Features.of` reads of a TFDS `DatasetInfo`."""
    return types.SimpleNamespace(name="pets", features=features, supervised_keys=supervised_keys)


def test_image_and_label_keys_are_inferred_or_asked_for() -> None:
    image = tfds.features.Image(shape=(None, None, 3))
    label = tfds.features.ClassLabel(names=["cat", "dog"])
    features = {"photo": image, "kind": label, "caption": tfds.features.Text()}
    found = tfds_dataset.Features.of(info(features), None, None, (32, 32))
    assert (found.image_key, found.label_key, found.class_names) == ("photo", "kind", ("cat", "dog"))
    assert found.input_spec.shape == (32, 32, 3) and found.resize_to == (32, 32)
    with pytest.raises(DatasetError, match=r"^dataset.image_size is needed: the images of 'pets' vary in size"):
        tfds_dataset.Features.of(info(features), None, None, None)
    two_images = {**features, "mask": tfds.features.Image(shape=(32, 32, 1))}
    with pytest.raises(DatasetError, match=r"^dataset.image_key is needed: dataset 'pets' has 2 image features: "
                                           r"photo, mask; name the one to use, e.g. dataset.image_key=photo$"):
        tfds_dataset.Features.of(info(two_images), None, None, (32, 32))
    chosen = tfds_dataset.Features.of(info(two_images), "mask", None, None)
    assert chosen.input_spec.shape == (32, 32, 1) and chosen.resize_to is None


# -- end to end ----------------------------------------------------------------------------
PREDICT_IMAGES = textwrap.dedent(
    """
    from pathlib import Path
    from PIL import Image
    spec = model.metadata.get_input_schema().inputs[0]
    height, width, channels = spec.shape[1:]
    files = sorted(p for p in Path(sys.argv[3]).rglob("*") if p.suffix in (".png", ".jpg", ".jpeg", ".bmp", ".gif"))
    images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((width, height), Image.BILINEAR))
                       for p in files if p.name != "broken.jpg"])
    probabilities = model.predict(images)
    names = model.metadata.metadata["class_names"]
    predicted = [names[i] for i in probabilities.argmax(1)]
    truth = [p.parent.name for p in files if p.name != "broken.jpg"]
    print(json.dumps({"names": names, "accuracy": float(np.mean([a == b for a, b in zip(predicted, truth)]))}))
    """
)

PREDICT_TABLE = textwrap.dedent(
    """
    import pandas as pd
    frame = pd.read_csv(sys.argv[3]).dropna()
    probabilities = model.predict(frame.drop(columns=["id", "species"]))
    names = model.metadata.metadata["class_names"]
    predicted = np.array(names)[probabilities.argmax(1)]
    print(json.dumps({"names": names, "accuracy": float(np.mean(predicted == frame["species"].to_numpy())),
                      "inputs": model.metadata.get_input_schema().input_names()}))
    """
)


def predictions(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
def test_a_folder_of_photos_trains_registers_reloads_and_predicts(photos: Path, mlflow_store: str,
                                                                 tmp_path: Path, capsys) -> None:
    overrides = ["dataset=image_folder", f"dataset.path={photos}", "dataset.image_size=[16,16]",
                 "dataset.on_bad_file=skip", "trainer.epochs=8", "trainer.verbose=0", "augment=light"]
    metrics = train(compose_plan(overrides))
    assert metrics["test_accuracy"] > 0.6, "3 classes: chance is 0.33"
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("photos").experiment_id])
    assert run.data.params["dataset.classes"] == "one, seven, zero"
    assert run.data.params["augment._target_"] == "pipeline.augment.Light" and "augment.rotation" in run.data.params
    assert run.data.params["data.version"] == f"photos:{run.data.params['data.digest'][:8]}"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | \
        {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"skipped_files.txt", "plots/augmented_examples.png", "plots/confusion_matrix.png",
            "plots/classification_report.txt"} <= artifacts
    report = Path(client.download_artifacts(run.info.run_id, "plots/classification_report.txt")).read_text()
    assert report.splitlines()[1].startswith("one ") and "seven" in report and "zero" in report
    (dataset_input,) = [i for i in run.inputs.dataset_inputs if i.dataset.name.startswith("photos:")][:1]
    assert dataset_input.dataset.source_type == "files"
    version = client.get_model_version_by_alias("photos-mlp", "champion")
    assert "**Classes**, in the order of the output columns: one, seven, zero." in version.description

    reloaded = reload_without_project(tmp_path, PREDICT_IMAGES, mlflow_store, "models:/photos-mlp@champion",
                                      str(photos))
    assert reloaded["names"] == list(CLASSES)
    assert reloaded["accuracy"] > 0.6, "raw files, resized by Pillow in a process without this project"

    cfg = compose_config(["model=models:/photos-mlp@champion", f"inputs={photos}", "on_bad_file=skip",
                          f"output={tmp_path / 'predicted.csv'}"], config_name="predict")
    written = predict.predict(cfg)
    rows = predictions(written)
    assert list(rows[0]) == ["input", "prediction", "probability", *CLASSES]
    assert len(rows) == 72 and "zero/broken.jpg" not in {row["input"] for row in rows}
    assert np.mean([row["input"].split("/")[0] == row["prediction"] for row in rows]) > 0.6
    assert f"72 predictions, 1 skipped by models:/photos-mlp@champion written to {written}" in capsys.readouterr().out
    with pytest.raises(DatasetError, match=r"^inputs: 1 of 73 image files cannot be decoded \(zero/broken.jpg\); "
                                           r"fix them, or set on_bad_file=skip to predict the rest$"):
        predict.predict(compose_config(["model=models:/photos-mlp@champion", f"inputs={photos}"],
                                       config_name="predict"))


@pytest.mark.slow
def test_a_spreadsheet_trains_registers_reloads_and_predicts(mlflow_store: str, tmp_path: Path) -> None:
    path = write_table(tmp_path / "wine.csv")
    overrides = ["dataset=csv", f"dataset.path={path}", "dataset.label=species", "dataset.drop=[id]",
                 "dataset.on_missing=drop", "trainer.epochs=15", "trainer.verbose=0"]
    metrics = train(compose_plan(overrides))
    assert metrics["test_accuracy"] > 0.8, "wine's classes separate well; chance is 0.4"
    reloaded = reload_without_project(tmp_path, PREDICT_TABLE, mlflow_store, "models:/wine-mlp@champion", str(path))
    assert reloaded["names"] == ["class_0", "class_1", "class_2"]
    assert reloaded["accuracy"] > 0.8, "a DataFrame of the CSV's raw columns, in a process without this project"
    assert "batch" in reloaded["inputs"] and "id" not in reloaded["inputs"]

    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("wine").experiment_id])
    scored = evaluate(compose_config(["model=models:/wine-mlp@champion", *overrides[:5], "log_run=false"],
                                     config_name="evaluate"))
    assert scored["accuracy"] == pytest.approx(run.data.metrics["test_accuracy"], abs=1e-6), "the same test rows"

    new = tmp_path / "new_wines.csv"
    new.write_text("\n".join(line for number, line in enumerate(path.read_text().splitlines()) if number != 1) + "\n")
    rows = predictions(predict.predict(compose_config([f"model=runs:/{run.info.run_id}", f"inputs={new}",
                                                       f"output={tmp_path / 'out.csv'}"], config_name="predict")))
    truth = [line.rsplit(",", 1)[1] for line in new.read_text().splitlines()[1:]]
    assert [row["input"] for row in rows[:2]] == ["new_wines.csv:2", "new_wines.csv:3"]
    assert np.mean([row["prediction"] == label for row, label in zip(rows, truth, strict=True)]) > 0.8

    lines = new.read_text().splitlines()
    cells = lines[3].split(",")
    cells[lines[0].split(",").index("alcohol")] = "n/a"
    lines[3] = ",".join(cells)  # line 4's alcohol
    new.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"^inputs: 1 of \d+ rows have a missing or unparsable cell, first "
                                           r"new_wines.csv line 4, column 'alcohol': missing value"):
        predict.predict(compose_config(["model=models:/wine-mlp@champion", f"inputs={new}"], config_name="predict"))
    rows = predictions(predict.predict(compose_config(["model=models:/wine-mlp@champion", f"inputs={new}",
                                                       "on_bad_file=skip", f"output={tmp_path / 'out.csv'}"],
                                                      config_name="predict")))
    assert len(rows) == len(lines) - 2 and "new_wines.csv:4" not in {row["input"] for row in rows}


@pytest.mark.parametrize("which, classes", [("iris", 3), ("breast_cancer", 2)])
def test_other_tables_train_above_chance(which: str, classes: int, mlflow_store: str, tmp_path: Path) -> None:
    path = write_table(tmp_path / f"{which}.csv", which)
    metrics = train(compose_plan(["dataset=csv", f"dataset.path={path}", "dataset.label=species", "dataset.drop=[id]",
                                  "dataset.on_missing=drop", "trainer.epochs=10", "trainer.verbose=0",
                                  "mlflow.log_model=false",
                                  f"architecture={'mlp_bn' if classes == 2 else 'residual_mlp'}"]))
    assert metrics["test_accuracy"] > (0.8 if classes == 3 else 0.85)
