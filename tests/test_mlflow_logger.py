"""The per-epoch MLflow logger: per-step values handed to it (the guard's gradient norms)
go out with the epoch's metrics, and a resumed run never gets a value twice."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from mlflow.tracking import MlflowClient

from callbacks.mlflow_logger import MLflowEpochLogger


def _compiled_model() -> keras.Model:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_values_handed_over_go_with_the_epoch_and_are_never_logged_twice(mlflow_store: str, tmp_path: Path) -> None:
    client = MlflowClient()
    run_id = client.create_run("0").info.run_id
    model = _compiled_model()

    logger = MLflowEpochLogger(run_id, client, offline_file=tmp_path / "offline.jsonl")
    logger.set_model(model)
    logger.on_train_begin()
    logger.log_later([("grad_norm", 1.5, 40), ("grad_norm/dense", 1.25, 40)])
    logger.on_epoch_end(0, {"loss": 0.5})
    logger.log_later([("grad_norm", 2.5, 90)])  # after the last epoch: sent by `wait`
    logger.on_train_end()
    assert _history(client, run_id, "grad_norm") == [(40, 1.5), (90, 2.5)]
    assert _history(client, run_id, "grad_norm/dense") == [(40, 1.25)]
    assert _history(client, run_id, "train_loss") == [(0, 0.5)]

    # A resume re-trains from a checkpoint before step 90 and epoch 0's end: what the run
    # already holds is not logged again; what it does not hold is.
    resumed = MLflowEpochLogger(run_id, client, offline_file=tmp_path / "offline.jsonl")
    resumed.set_model(model)
    resumed.on_train_begin()
    resumed.log_later([("grad_norm", 2.5, 90), ("grad_norm", 3.5, 140)])
    resumed.on_epoch_end(0, {"loss": 0.5})
    resumed.on_epoch_end(1, {"loss": 0.25})
    resumed.on_train_end()
    assert _history(client, run_id, "grad_norm") == [(40, 1.5), (90, 2.5), (140, 3.5)]
    assert _history(client, run_id, "train_loss") == [(0, 0.5), (1, 0.25)]
    assert not (tmp_path / "offline.jsonl").exists()
    assert np.isclose(_history(client, run_id, "lr")[-1][1], 0.1)
