"""A run whose artifacts are deleted while it trains (`rm -r mlruns/`) says so and logs
its `config.yaml` again, so `reproduce=` and `resume=` still have the record they read."""

from __future__ import annotations

import shutil
from urllib.parse import urlparse

import keras
import mlflow
import pytest
from conftest import compose_plan
from mlflow.tracking import MlflowClient

from pipeline.train import train


class DeleteRunArtifacts(keras.callbacks.Callback):
    """Test callback (selected by `_target_`): deletes the run's artifact directory after epoch 0."""

    def on_epoch_end(self, epoch, logs=None) -> None:
        if epoch == 0:
            shutil.rmtree(urlparse(mlflow.get_artifact_uri()).path)


def test_config_deleted_mid_run_is_logged_again(tfds_dir: str, mlflow_store: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    train(compose_plan(["trainer.epochs=2", f"dataset.data_dir={tfds_dir}", "mlflow.log_model=false",
                        "+callbacks.wipe._target_=test_lost_artifacts.DeleteRunArtifacts"]))
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("digits").experiment_id])
    assert "config.yaml of run" in caplog.text and "logged again" in caplog.text
    assert "config.yaml" in {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    again = compose_plan([f"reproduce={run.info.run_id}"])
    assert again.reproduces == run.info.run_id and again.cfg.trainer.epochs == 2
