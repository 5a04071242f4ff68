"""The image-folder input pipeline against Keras's, and what augmentation costs a ResNet.

    python -m benchmarks.input_pipeline                  # 5,000 JPEGs; 9 input rounds, 3 resnet rounds
    python -m benchmarks.input_pipeline --rounds 5 --docs

1. Input throughput, images per second, on one generated folder of 32x32 JPEGs (10
   classes, class-per-subfolder), batch 128, interleaved rounds:
   - `keras.utils.image_dataset_from_directory(folder, image_size=(32, 32))`, iterated
     for 3 epochs: it lists, reads and decodes every file in every epoch;
   - `dataset=image_folder` (`pipeline.data.load`, `cache=memory`, the default): its
     first epoch is the folder's listing and one parallel decode of every file (all
     splits) plus the training epoch; later epochs are the training split, in memory.
   First epoch: the folder's images per second of each (both decode all of them once).
   Later epochs: training images delivered per second. Targets: >= 1.0x and >= 3x.
   The files are read once before the rounds, so both find them in the page cache.
2. `resnet` training throughput on the same folder (`pipeline.train.train`, 3 epochs,
   the fastest steady epoch) with `augment=flip_crop` against `augment=none`: the
   augmentation in tf.data (where the pipeline runs it), and, as the alternative
   measured, the same flip and crop inside the train step (a layer in front of the
   model, active only in training). Target: tf.data >= 0.9x.

Last line: `input pipeline: image_folder/keras first epoch X.XXx, later epochs Y.YYx;
resnet augment=flip_crop/none Z.ZZx in tf.data, W.WWx in the train step`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import keras

from benchmarks.common import (
    Ratio,
    Throughput,
    host_steadiness,
    interleaved_runs,
    measured_on,
    update_docs,
)
from pipeline.augment import FlipCrop
from pipeline.datasets.image_folder import ImageFolder

IMAGES, CLASSES, SIZE, BATCH = 5000, 10, 32, 128
EPOCHS = 3


def make_folder(root: Path, images: int = IMAGES) -> Path:
    """`images` 32x32 JPEGs in `CLASSES` class folders: a coloured square whose hue is the
    class, on noise (learnable, and with JPEG's real decode cost)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(images):
        label = index % CLASSES
        pixels = rng.integers(0, 120, size=(SIZE, SIZE, 3), dtype=np.uint8)
        top, left = rng.integers(0, SIZE - 12, size=2)
        pixels[top:top + 12, left:left + 12] = np.array([255 * ((label >> bit) & 1) for bit in range(3)]) \
            * 0.6 + 90 + 10 * (label // 8)
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:05d}.jpg", quality=90)
    return root


def read_every_file(root: Path) -> None:
    for path in root.rglob("*.jpg"):
        path.read_bytes()


def keras_epochs(folder: Path) -> list[tuple[float, int]]:
    """(seconds, images) of each epoch of `image_dataset_from_directory`, listing included in the first."""
    import keras

    start = time.perf_counter()
    ds = keras.utils.image_dataset_from_directory(str(folder), image_size=(SIZE, SIZE), batch_size=BATCH,
                                                  shuffle=True, seed=0, verbose=False)
    epochs = []
    for _ in range(EPOCHS):
        count = sum(int(images.shape[0]) for images, _ in ds)
        now = time.perf_counter()
        epochs.append((now - start, count))
        start = now
    return epochs


def pipeline_epochs(folder: Path) -> list[tuple[float, int]]:
    """(seconds, images) of each epoch of `dataset=image_folder`; the first epoch's images
    are the whole folder (all of it is decoded then), later ones the training split's."""
    from pipeline import data
    from pipeline.config import compose

    cfg = compose(["dataset=image_folder", f"dataset.path={folder}", f"dataset.image_size=[{SIZE},{SIZE}]",
                   f"dataset.batch_size={BATCH}"])
    start = time.perf_counter()
    splits = data.load(cfg.dataset, seed=0)
    batches = iter(splits.train)  # as `fit` reads it: one iterator, every epoch back to back
    epochs = []
    for epoch in range(EPOCHS):
        count = sum(int(next(batches)[0].shape[0]) for _ in range(splits.steps_per_epoch))
        now = time.perf_counter()
        epochs.append((now - start, sum(splits.sizes.values()) if epoch == 0 else count))
        start = now
    return epochs


def input_throughput(rounds: int, folder: Path) -> tuple[Ratio, Ratio]:
    """Interleaved rounds of both pipelines: (first-epoch ratio, later-epochs ratio)."""
    first, later = [], []
    for index in range(rounds):
        order = ["keras", "pipeline"] if index % 2 == 0 else ["pipeline", "keras"]
        measured = {name: (keras_epochs if name == "keras" else pipeline_epochs)(folder) for name in order}
        rates = {name: [count / seconds for seconds, count in epochs] for name, epochs in measured.items()}
        first.append(rates["pipeline"][0] / rates["keras"][0])
        later.append(statistics.median(rates["pipeline"][1:]) / statistics.median(rates["keras"][1:]))
        print(f"  round {index + 1}: first epoch keras {rates['keras'][0]:,.0f}/s, image_folder "
              f"{rates['pipeline'][0]:,.0f}/s; later epochs keras {statistics.median(rates['keras'][1:]):,.0f}/s, "
              f"image_folder {statistics.median(rates['pipeline'][1:]):,.0f}/s", flush=True)
    as_ratio = lambda ratios: Ratio(statistics.median(ratios), min(ratios), max(ratios),  # noqa: E731
                                    statistics.median(ratios))
    return as_ratio(first), as_ratio(later)


def resnet_on_device_flip_crop(input_spec, **hyperparameters):
    """`architectures.resnet.build` behind `FlipCrop` applied in the train step: the
    alternative to augmenting in tf.data that this benchmark measures."""
    from architectures import resnet

    body = resnet.build(input_spec, **hyperparameters)
    inputs = keras.Input(shape=input_spec.shape, dtype=input_spec.dtype, name="image")
    return keras.Model(inputs, body(TrainingFlipCrop()(inputs)), name="resnet_on_device_augmented")


class TrainingFlipCrop(keras.layers.Layer):
    """`pipeline.augment.FlipCrop` as a layer active only in training, seeded by a SeedGenerator."""

    def __init__(self) -> None:
        super().__init__(name="flip_crop")
        self.flip_crop, self.generator = FlipCrop(), keras.random.SeedGenerator(0)

    def call(self, images, training=None):
        if not training:
            return images
        return self.flip_crop.images(images, keras.ops.cast(self.generator.next(), "int64"))


def resnet_throughput(folder: Path, augment: str, store: Path, train_examples: int) -> Throughput:
    from pipeline.plan import compose
    from pipeline.train import train

    overrides = ["architecture=resnet", "dataset=image_folder", f"dataset.path={folder}",
                 f"dataset.image_size=[{SIZE},{SIZE}]", f"dataset.batch_size={BATCH}", f"trainer.epochs={EPOCHS}",
                 "trainer.verbose=0", "callbacks.early_stopping=null", "mlflow.log_model=false",
                 f"mlflow.tracking_uri=sqlite:///{store}", f"callbacks.checkpoint.directory={store.parent / 'ckpt'}",
                 "+callbacks.zz_timer._target_=benchmarks.common.EpochTimer"]
    if augment == "in_step":
        overrides += ["architecture._target_=benchmarks.input_pipeline.resnet_on_device_flip_crop"]
    else:
        overrides += [f"augment={augment}"]
    train(compose(overrides))
    return Throughput.of_epochs(train_examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the resnet comparison")
    parser.add_argument("--input-rounds", type=int, default=9,
                        help="interleaved rounds of the input comparison (a few seconds each; Keras's first epoch "
                             "varies by half from one round to the next on a shared host)")
    parser.add_argument("--images", type=int, default=IMAGES)
    parser.add_argument("--docs", action="store_true", help="write the figures into docs/performance.md")
    args = parser.parse_args()
    steadiness = host_steadiness()
    print(steadiness, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(Path(tmp) / "folder", args.images)
        read_every_file(folder)
        print(f"input: {args.images} JPEGs of {SIZE}x{SIZE}, batch {BATCH}, {args.input_rounds} interleaved rounds",
              flush=True)
        first, later = input_throughput(args.input_rounds, folder)
        print(f"resnet: {args.rounds} interleaved rounds of augment=none, flip_crop in tf.data, flip_crop in the "
              "train step", flush=True)
        store = Path(tmp) / "mlflow.db"
        train_examples = len(ImageFolder(str(folder)).list_files()[0]["train"])
        rounds = interleaved_runs(args.rounds, {
            "none": lambda: resnet_throughput(folder, "none", store, train_examples),
            "tf.data": lambda: resnet_throughput(folder, "flip_crop", store, train_examples),
            "in_step": lambda: resnet_throughput(folder, "in_step", store, train_examples),
        })
        in_data, in_step = Ratio.of(rounds, "tf.data", "none"), Ratio.of(rounds, "in_step", "none")
    if args.docs:
        update_docs("input-pipeline", "\n".join([
            "| comparison | ratio | target |",
            "| --- | --- | --- |",
            f"| `image_folder` / `image_dataset_from_directory`, first epoch | {first.cell('rounds')} | ≥ 1.0× |",
            f"| `image_folder` / `image_dataset_from_directory`, later epochs | {later.cell('rounds')} | ≥ 3× |",
            f"| `resnet` with `augment=flip_crop` in tf.data / `augment=none` | {in_data.cell('rounds')} | ≥ 0.9× |",
            f"| `resnet` with the same flip and crop in the train step / `augment=none` | {in_step.cell('rounds')} | |",
            "",
            f"{measured_on()} {args.images} JPEGs of {SIZE}x{SIZE}, batch {BATCH}; {steadiness}. "
            "`python -m benchmarks.input_pipeline --docs`.",
        ]))
    print(f"input pipeline: image_folder/keras first epoch {first.median:.2f}x, later epochs {later.median:.2f}x; "
          f"resnet augment=flip_crop/none {in_data.median:.2f}x in tf.data, {in_step.median:.2f}x in the train step",
          flush=True)


if __name__ == "__main__":
    main()
