"""A tracking server that dies mid-run: training goes on and nothing it produced is lost."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import compose_plan
from mlflow_server import MlflowServer, start_mlflow_server

from pipeline.errors import PipelineError
from pipeline.train import train


class StopServerAfterEpoch(keras.callbacks.Callback):
    """Test callback (selected by `_target_`): stops `server` when epoch 1 ends."""

    server: MlflowServer | None = None

    def on_epoch_end(self, epoch, logs=None) -> None:
        if epoch == 1:
            StopServerAfterEpoch.server.stop()


@pytest.mark.slow
def test_training_survives_the_server_going_away(tfds_dir: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    server = start_mlflow_server(tmp_path / "server")
    StopServerAfterEpoch.server = server
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # give up on the dead server at once
    try:
        with pytest.raises(PipelineError) as error:
            train(compose_plan([
                f"dataset.data_dir={tfds_dir}", "trainer.epochs=4", "trainer.verbose=0",
                f"mlflow.tracking_uri={server.url}", f"callbacks.checkpoint.directory={tmp_path / 'checkpoints'}",
                "+callbacks.outage._target_=test_server_outage.StopServerAfterEpoch",
            ]))
    finally:
        server.stop()
    message = str(error.value)
    assert message.startswith("training finished but MLflow could not record it")
    model_file, offline = tmp_path / "model.keras", tmp_path / "offline-metrics.jsonl"
    assert f"Kept: the model in {model_file}, per-epoch metrics in {offline}, checkpoints in " in message
    # Every epoch the server missed is in the local file, once; the model and checkpoints are whole.
    lines = [json.loads(line) for line in offline.read_text().splitlines()]
    assert sorted({line["step"] for line in lines if line["key"] == "val_loss"}) == [1, 2, 3]
    assert all(np.isfinite(line["value"]) for line in lines)
    # The guard's gradient norms go with their epoch's metrics: logged every 50 steps, at
    # the end of the executions that pass 50, 100 and 150 (16-step executions, 41-step epochs).
    assert sorted(line["step"] for line in lines if line["key"] == "grad_norm") == [56, 113, 154]
    import architectures  # noqa: F401  (registers the custom layers a saved model may use)

    reloaded = keras.saving.load_model(model_file)
    assert reloaded.predict(np.zeros((2, 8, 8, 1), "uint8"), verbose=0).shape == (2, 10)
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-164")  # 4 epochs x 41 steps
