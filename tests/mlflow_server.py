"""A real `mlflow server` for tests: sqlite backend and proxied artifacts in a temp dir,
a free port on 127.0.0.1, and one training run against it shared by the whole session;
and the same server on a private PostgreSQL cluster.

`tests/conftest.py` imports the fixtures `mlflow_server` (the server's URL) and
`server_run` (a run trained with `python -m pipeline.train mlflow=server`). Results are
read back over MLflow's REST API with `requests`, as any non-Python client would.

`postgres` (a throwaway PostgreSQL cluster: `initdb` + `pg_ctl` in a temp dir, on a free
port, as the `postgres` user when run as root) and `postgres_mlflow_server` (an `mlflow
server --backend-store-uri postgresql+psycopg2://...` on it) are imported by the tests
that need them. Where PostgreSQL's programs are not installed they skip, saying so;
under CI (`$CI` set, as `.ci/run` runs) they fail instead, since `.ci/run` installs them.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

# FACTS.md: `GET /health` answers after 10-15 s on 2 cores; leave room for a loaded machine.
STARTUP_TIMEOUT = 90.0
# How a machine without PostgreSQL gets it (Debian; `.ci/run` does this).
POSTGRES_INSTALL = "apt-get install postgresql"


@dataclass
class MlflowServer:
    """A running `mlflow server` subprocess (its own process group) and where it writes."""

    url: str
    root: Path
    process: subprocess.Popen
    log_path: Path
    backend_store_uri: str

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the server's process group (the CLI and its uvicorn worker), then SIGKILL."""
        stop_process_group(self.process, timeout)


def stop_process_group(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group `process` leads (started with `start_new_session`), then SIGKILL."""
    if process.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_until_answers(url: str, process: subprocess.Popen, timeout: float, log_tail: Callable[[], str]) -> None:
    """Poll `url` until it answers 200.

    Raises:
        RuntimeError: `process` exited, or `url` did not answer within `timeout` seconds;
            the message carries `log_tail()`.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[:4]} exited with code {process.returncode}:\n{log_tail()}")
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no answer from {url} within {timeout:.0f} s:\n{log_tail()}")


def free_port() -> int:
    """A port the OS just handed out; the server binds it a moment later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mlflow_server(root: Path, timeout: float = STARTUP_TIMEOUT,
                        backend_store_uri: str | None = None) -> MlflowServer:
    """Start `mlflow server` on a free port; return once `/health` answers.

    Args:
        root: its working directory, log (`server.log`) and artifacts (`artifacts/`).
        timeout: seconds to wait for `/health`.
        backend_store_uri: where runs and the registry go, e.g. a `postgres` fixture's
            `postgresql+psycopg2://...`; None: a new sqlite file `root/mlflow.db`.

    Raises:
        RuntimeError: the server exited or did not answer within `timeout` seconds; the
            message carries the end of its log.
    """
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = root / "server.log"
    backend_store_uri = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--backend-store-uri", backend_store_uri,
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
    server = MlflowServer(url=f"http://127.0.0.1:{port}", root=root, process=process, log_path=log_path,
                          backend_store_uri=backend_store_uri)
    try:
        wait_until_answers(f"{server.url}/health", process, timeout, server.log_tail)
    except RuntimeError:
        server.stop()
        raise
    return server


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


# -- the same server on PostgreSQL --------------------------------------------------------


def postgres_bin_dir() -> Path | None:
    """Where PostgreSQL's server programs (`initdb`, `pg_ctl`, `createdb`) are: beside an
    `initdb` on PATH, else Debian's newest `/usr/lib/postgresql/<major>/bin` (its
    `postgresql` package puts only wrappers such as `pg_ctlcluster` on PATH); None if neither."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    debian = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if p.parts[-3].isdigit()]
    return max(debian, key=lambda bin_dir: int(bin_dir.parent.name)) if debian else None


@dataclass
class PostgresCluster:
    """A throwaway PostgreSQL cluster: its own data dir and port, trust auth on 127.0.0.1 only."""

    uri: str  # SQLAlchemy URI of its `mlflow` database, as `mlflow server --backend-store-uri` takes it
    port: int
    root: Path  # removed by stop(); holds data/ and postgres.log
    bin_dir: Path
    user: str | None  # the OS user the server runs as (PostgreSQL refuses root); None: this process's

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def run(self, program: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A PostgreSQL program from `bin_dir`, as the cluster's user; raises with its output if it fails."""
        command = [str(self.bin_dir / program), *args]
        as_user = {}
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        env = {**os.environ, "LC_ALL": "C", **({"HOME": str(self.root)} if self.user else {})}
        result = subprocess.run(command, cwd=self.root, env=env, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL, **as_user)
        if result.returncode != 0:
            raise RuntimeError(f"{shlex.join(command)} exited with {result.returncode}:\n{result.stdout[-2000:]}"
                               f"{result.stderr[-2000:]}\n{self.log_tail()}")
        return result

    def stop(self) -> None:
        """Stop the server (`pg_ctl stop -m fast`: disconnect clients, shut down) and delete the cluster."""
        try:
            if (self.root / "data" / "postmaster.pid").exists():
                self.run("pg_ctl", "stop", "-D", str(self.root / "data"), "-m", "fast", "-w")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(bin_dir: Path, timeout: float = 60.0) -> PostgresCluster:
    """`initdb` a new cluster in a temp dir, start it on a free port and create database `mlflow`.

    Run as root (CI, containers), the cluster belongs to the `postgres` user (the Debian
    package creates it; else `nobody`), since PostgreSQL refuses to run as root. Its dir
    is made with `tempfile`, not pytest's `tmp_path`: pytest's base dir is private to the
    user running the tests, so another user could not enter it. Durability is switched
    off (`fsync`, `synchronous_commit`, `full_page_writes`): the cluster lives for one test module.

    Raises:
        RuntimeError: a PostgreSQL program failed; the message carries its output and the server log.
    """
    user = None
    if os.geteuid() == 0:
        user = next((name for name in ("postgres", "nobody") if _user_exists(name)), None)
        if user is None:
            raise RuntimeError("running as root, and neither a `postgres` nor a `nobody` user exists "
                               "to run PostgreSQL as (it refuses root)")
    # Another user must reach it: under /tmp, not a $TMPDIR that may be private to this one.
    root = Path(tempfile.mkdtemp(prefix="pipeline-postgres-", dir="/tmp" if user is not None else None))
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    port = free_port()
    cluster = PostgresCluster(uri=f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow", port=port, root=root,
                              bin_dir=bin_dir, user=user)
    data = str(root / "data")
    try:
        cluster.run("initdb", "-D", data, "-U", "mlflow", "--auth=trust", "--encoding=UTF8", "--locale=C",
                    "--no-sync", timeout=timeout)
        server_options = (f"-p {port} -c listen_addresses=127.0.0.1 -k {shlex.quote(data)} "
                          "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        cluster.run("pg_ctl", "start", "-D", data, "-l", str(cluster.log_path), "-w", "-t", str(int(timeout)),
                    "-o", server_options, timeout=timeout + 10)
        cluster.run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="module")
def postgres():
    """A running throwaway PostgreSQL cluster (`PostgresCluster`), deleted after the module.

    Skips where PostgreSQL is not installed, naming how to install it; under CI (`$CI`
    set) fails instead: `.ci/run` installs it, so its absence there is a broken CI.
    """
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        reason = (f"PostgreSQL is not installed: no initdb on PATH or in /usr/lib/postgresql/*/bin "
                  f"({POSTGRES_INSTALL})")
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{reason}; CI must run these tests (.ci/run installs it)")
        pytest.skip(reason)
    cluster = start_postgres(bin_dir)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def postgres_mlflow_server(postgres: PostgresCluster, tmp_path_factory: pytest.TempPathFactory) -> MlflowServer:
    """A real `mlflow server` whose runs and model registry are in the `postgres` cluster;
    artifacts proxied into a temp dir. Stopped after the module, before the cluster."""
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server_postgres"), backend_store_uri=postgres.uri)
    try:
        yield server
    finally:
        server.stop()
