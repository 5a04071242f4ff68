"""A real `mlflow server` for tests: sqlite backend and proxied artifacts in a temp dir,
a free port on 127.0.0.1, and one training run against it shared by the whole session.

`tests/conftest.py` imports the fixtures `mlflow_server` (the server's URL) and
`server_run` (a run trained with `python -m pipeline.train mlflow=server`). Results are
read back over MLflow's REST API with `requests`, as any non-Python client would.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

# FACTS.md: `GET /health` answers after 10-15 s on 2 cores; leave room for a loaded machine.
STARTUP_TIMEOUT = 90.0


@dataclass
class MlflowServer:
    """A running `mlflow server` subprocess (its own process group) and where it writes."""

    url: str
    root: Path
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server's process group (the CLI and its uvicorn worker), then SIGKILL."""
        if self.process.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=timeout)
                return
            except subprocess.TimeoutExpired:
                continue


def free_port() -> int:
    """A port the OS just handed out; the server binds it a moment later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(root: Path, timeout: float = STARTUP_TIMEOUT) -> MlflowServer:
    """Start `mlflow server` on a free port with its store in `root`; return once `/health` answers.

    Raises:
        RuntimeError: the server exited or did not answer within `timeout` seconds; the
            message carries the end of its log (`root/server.log`).
    """
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = root / "server.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--workers", "1",  # the default 4 uvicorn workers cost ~4x the memory for one client
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # The GenAI job runner (an extra huey consumer process) is not needed to track training runs.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with open(log_path, "wb") as log_file:
        # Own process group, so stop() reaches the uvicorn child too.
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = MlflowServer(url=f"http://127.0.0.1:{port}", root=root, process=process, log_path=log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {process.returncode}:\n{server.log_tail()}")
        try:
            if requests.get(f"{server.url}/health", timeout=2).ok:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"mlflow server gave no /health answer within {timeout:.0f} s:\n{server.log_tail()}")


def rest(url: str, method: str, endpoint: str, **payload: Any) -> dict:
    """Call `/api/2.0/mlflow/<endpoint>`: `payload` is the query (GET) or JSON body (POST).

    Raises:
        AssertionError: the server answered with an error; the message carries its body.
    """
    kwargs = {"params": payload} if method == "GET" else {"json": payload}
    response = requests.request(method, f"{url}/api/2.0/mlflow/{endpoint}", timeout=30, **kwargs)
    assert response.ok, f"{method} {endpoint} {payload} -> {response.status_code}: {response.text[:1000]}"
    return response.json()


def artifact_paths(url: str, run_id: str, path: str = "") -> dict[str, bool]:
    """The run's artifacts directly under `path`: {path: is_dir}."""
    listing = rest(url, "GET", "artifacts/list", run_id=run_id, **({"path": path} if path else {}))
    return {f["path"]: f.get("is_dir", False) for f in listing.get("files", [])}


@dataclass(frozen=True)
class ServerRun:
    """One FINISHED training run on the session's server, as the REST API reports it."""

    url: str
    experiment_id: str
    run_id: str
    run: dict  # the `run` object of runs/get: info, data.params/metrics/tags, inputs, outputs


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """URL of a real MLflow tracking server shared by the session; stopped at the end."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server_run(mlflow_server: str, tfds_dir: str, tmp_path_factory: pytest.TempPathFactory) -> ServerRun:
    """`python -m pipeline.train mlflow=server trainer.epochs=2` pointed at the server by
    `MLFLOW_TRACKING_URI`, exactly as a user would; trained once per session."""
    from conftest import run_module  # imported here: conftest imports this module

    result = run_module("pipeline.train", "mlflow=server", "trainer.epochs=2", f"dataset.data_dir={tfds_dir}",
                        cwd=tmp_path_factory.mktemp("server_train"), env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert result.returncode == 0, f"training against the server failed:\n{result.stderr[-3000:]}"
    experiment_id = rest(mlflow_server, "GET", "experiments/get-by-name", experiment_name="digits")[
        "experiment"]["experiment_id"]
    runs = rest(mlflow_server, "POST", "runs/search", experiment_ids=[experiment_id]).get("runs", [])
    assert len(runs) == 1, f"expected the one training run, found {len(runs)}"
    run_id = runs[0]["info"]["run_id"]
    run = rest(mlflow_server, "GET", "runs/get", run_id=run_id)["run"]
    return ServerRun(url=mlflow_server, experiment_id=experiment_id, run_id=run_id, run=run)
