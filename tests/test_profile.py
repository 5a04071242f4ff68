"""`debug=profile`: a real run traces a few steady-state train steps with TensorFlow's
profiler and logs the trace (`profile/plugins/profile/*/*.xplane.pb`, what TensorBoard's
profile plugin reads) and `profile/top_ops.txt` (the ops by self time, for the MLflow UI)
to the run, which registers nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

from conftest import compose_plan
from mlflow.tracking import MlflowClient

from pipeline.summary import closing_block
from pipeline.train import train


def artifact_paths(client: MlflowClient, run_id: str, path: str) -> list[str]:
    """Every file under artifact directory `path` of the run."""
    files = []
    for item in client.list_artifacts(run_id, path):
        files += artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return files


def test_debug_profile_logs_a_trace_and_its_top_ops(tfds_dir: str, mlflow_store: str, tmp_path: Path) -> None:
    # Digits has 41 train steps per epoch in executions of 16: steps 0-15 are skipped (the
    # train function traces and compiles), 16-31 and 32-40 traced, then validation stops it.
    train(compose_plan(["debug=profile", "callbacks.profile.skip_steps=16", "callbacks.profile.trace_steps=32",
                        f"dataset.data_dir={tfds_dir}"]))
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["debug"] == "profile"
    assert client.search_model_versions() == []  # a debug run registers nothing
    assert "registered_model" not in run.data.tags
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 1  # fit ended once the trace was logged
    kept = Path(run.data.tags["profile_dir"])  # where it was written, for tensorboard --logdir
    assert kept == tmp_path / "profile" / run.info.run_id and list(kept.glob("plugins/profile/*/*.xplane.pb"))
    assert re.search(f"^profile +tensorboard --logdir {kept}  # pip install", closing_block(client, run.info.run_id),
                     re.MULTILINE)

    files = artifact_paths(client, run.info.run_id, "profile")
    assert any(re.fullmatch(r"profile/plugins/profile/[^/]+/[^/]+\.xplane\.pb", f) for f in files), files
    assert "profile/top_ops.txt" in files
    text = Path(client.download_artifacts(run.info.run_id, "profile/top_ops.txt", str(tmp_path / "down"))).read_text()
    assert text.startswith("debug=profile: train steps 16-40 (25 steps, epoch 1), the first execution from step 16 on")
    # A row of the by-op table: self ms, ms/step, %, count, type, the model's own op name.
    rows = re.findall(r"^ +([\d.]+) +([\d.]+) +([\d.]+) +(\d+)  (\w+) +(\S+)$", text, re.MULTILINE)
    matmuls = [row for row in rows if "MatMul" in row[4] and "dense" in row[5]]
    assert matmuls, text
    assert all(int(count) % 25 == 0 for *_, count, _, _ in matmuls)  # once per traced step (or per use)
    assert sum(float(row[0]) for row in rows) > 0
