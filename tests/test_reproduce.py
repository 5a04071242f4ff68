"""reproduce=RUN_ID: the recorded config trains again, as a new run, to identical metrics."""

from __future__ import annotations

import pytest
from conftest import compose_plan
from mlflow.tracking import MlflowClient

from pipeline.errors import ConfigError
from pipeline.train import train


def test_reproduce_gives_identical_metrics_in_a_new_run(tfds_dir: str, mlflow_store: str) -> None:
    first = train(compose_plan([f"dataset.data_dir={tfds_dir}", "trainer.epochs=2", "determinism=true",
                                  "optimizer=sgd", "optimizer.lr=0.05", "trainer.verbose=0"]))
    client = MlflowClient()
    experiment = client.get_experiment_by_name("digits").experiment_id
    (original,) = client.search_runs([experiment])

    again = train(compose_plan([f"reproduce={original.info.run_id}", "determinism=true"]))
    assert again == first  # every final metric, bit for bit
    runs = {r.info.run_id: r for r in client.search_runs([experiment])}
    assert len(runs) == 2
    (copy,) = [r for run_id, r in runs.items() if run_id != original.info.run_id]
    assert copy.data.tags["reproduces"] == original.info.run_id
    assert copy.data.params["optimizer._target_"] == "keras.optimizers.SGD"  # the recorded config, not the defaults
    for key in ("train_loss", "val_loss", "train_grad_norm_max"):
        assert ([m.value for m in client.get_metric_history(copy.info.run_id, key)]
                == [m.value for m in client.get_metric_history(original.info.run_id, key)]), key


def test_reproduce_refuses_other_changes_and_unknown_runs(mlflow_store: str) -> None:
    with pytest.raises(ConfigError, match="reproduce=abc: a reproduction uses the run's recorded config. "
                                          "Received: optimizer.lr=0.1"):
        train(compose_plan(["reproduce=abc", "optimizer.lr=0.1"]))
    with pytest.raises(ConfigError, match="reproduce: no run 'abc' in the tracking store"):
        train(compose_plan(["reproduce=abc"]))
