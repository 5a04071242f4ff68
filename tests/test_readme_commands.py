"""The README and docs/*.md checked by machine (issues 20 and 33): every command in their
code blocks that can run offline runs here, on tiny settings, and must succeed, or fail
with the very line the page shows under its `$ ` prompt.

Each shell command of README.md and docs/*.md (```bash, ```sh and untagged blocks, `\\`
continuations joined, `&&` split, comments and `$ ` prompts removed) and each inline
`python -m pipeline.…` gets exactly one disposition (a command shown on several pages is
one command, run once):

- `python -m pipeline.train|evaluate|inspect` runs by default: in this process, through
  the same `cli_main` the command runs (Hydra parses the very arguments), with `TINY`
  appended; the quick start and `mlflow ui` (`IN_SUBPROCESS`) run as typed in a fresh
  interpreter, like a user's terminal; `MLFLOW_CLI` commands run in this process
  through MLflow's own click group;
- `ELSEWHERE`: run by another test of the suite, named, whose source must still use
  the command's arguments and expect the output the README shows (so the two cannot
  drift apart unnoticed);
- `NOT_RUN`: cannot run offline here, with the reason.

Any other command fails `test_every_command_has_exactly_one_disposition` until someone
decides, and every table entry must still be in the README or docs/. Placeholders (`RUN_ID`,
`models:/digits-mlp/3`) are replaced by what the quick start made (`PLACEHOLDERS`).
Each ```python block runs too. Cost: about 2 minutes on one worker, most of it the
quick start's fresh interpreter and a few seconds per in-process smoke run.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, new_mlflow_store, run_in_process, run_module
from mlflow.tracking import MlflowClient
from mlflow_server import free_port, stop_process_group, wait_until_answers
from own_data import make_image_folder, write_table

README = REPO / "README.md"
# The pages whose commands are checked: the README first, then docs/ in name order.
DOCUMENTS = [README, *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
ENTRY_POINTS = ("pipeline.train", "pipeline.evaluate", "pipeline.inspect", "pipeline.predict")


@dataclass(frozen=True)
class Command:
    """One command of the README or docs/, as a user would type it."""

    text: str  # continuation lines joined, comment and `$ ` prompt removed, spaces collapsed
    line: int  # where it starts in its page
    expected: tuple[str, ...] = ()  # the output the page shows under its `$ ` prompt
    page: str = "README.md"  # the page, relative to the repository

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def env(self) -> dict[str, str]:
        """Leading `NAME=value` assignments."""
        env = {}
        for token in shlex.split(self.text):
            if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", token):
                break
            name, _, value = token.partition("=")
            env[name] = value
        return env

    @property
    def argv(self) -> list[str]:
        """The words after the environment assignments."""
        return shlex.split(self.text)[len(self.env):]

    @property
    def entry_point(self) -> str | None:
        """`pipeline.train` for `python -m pipeline.train ...`, else None."""
        argv = self.argv
        if argv[:2] == ["python", "-m"] and len(argv) > 2 and argv[2] in ENTRY_POINTS:
            return argv[2]
        return None


def strip_comment(line: str) -> str:
    """`line` without a shell comment: a `#` at its start or after a blank, outside quotes."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def block_commands(body: str, first_line: int, page: str = "README.md") -> list[Command]:
    """The commands of one shell block. With `$ ` prompts, the lines under a prompt are
    its expected output; without, every line is a command (`\\` continues it)."""
    lines = body.splitlines()
    prompted = any(line.startswith("$ ") for line in lines)
    commands: list[Command] = []
    pending, start = "", 0
    for number, line in enumerate(lines, first_line):
        if prompted and not line.startswith("$ "):
            if commands and line.strip():
                last = commands[-1]
                commands[-1] = Command(last.text, last.line, (*last.expected, line.strip()), last.page)
            continue
        line = line.removeprefix("$ ") if prompted else line
        if not pending:
            start = number
        text = strip_comment(line).rstrip()
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        pending += text
        for part in pending.split(" && "):
            if part.strip():
                commands.append(Command(" ".join(part.split()), start, page=page))
        pending = ""
    return commands


def page_commands(text: str, page: str = "README.md") -> list[Command]:
    """Every shell command in `text`'s fenced blocks (a command typed twice, as the
    Optuna block's "again", runs twice), then every inline `python -m pipeline.…` span of
    its prose that no block shows."""
    commands: list[Command] = []
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        language, body = match.groups()
        first_line = text.count("\n", 0, match.start()) + 2
        if language not in SHELL_LANGUAGES or not is_shell(body):
            continue
        commands += block_commands(body, first_line, page)
    prose = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
    for match in re.finditer(r"`(python -m pipeline\.[^`\n]*)`", prose):
        inline = Command(" ".join(match.group(1).split()), prose.count("\n", 0, match.start()) + 1, page=page)
        if inline.text not in {c.text for c in commands}:
            commands.append(inline)
    return commands


# Untagged blocks that are not commands, by their first line.
NOT_SHELL = {"conf/": "the Layout section's tree of folders"}


def is_shell(body: str) -> bool:
    first = body.lstrip().split("\n", 1)[0]
    return not any(first.startswith(prefix) for prefix in NOT_SHELL)


def all_commands() -> list[Command]:
    """The commands of every page in `DOCUMENTS`; a command an earlier page shows already
    is left out (within one page, a repeated command stays: it runs again)."""
    commands: list[Command] = []
    for path in DOCUMENTS:
        earlier = {c.text for c in commands}
        commands += [c for c in page_commands(path.read_text(), str(path.relative_to(REPO))) if c.text not in earlier]
    return commands


COMMANDS = all_commands()


# -- dispositions -----------------------------------------------------------------------

# Appended to every command run here: one epoch of 3 batches per split, nothing
# registered (conf/debug/smoke.yaml), on the session's prepared digits. A command's own
# `trainer.epochs` is the one value of the README's that this shrinks. `{tfds}` is the
# TFDS data dir.
TINY = {
    "pipeline.train": ("debug=smoke", "trainer.epochs=1", "dataset.data_dir={tfds}"),
    "pipeline.evaluate": ("dataset.data_dir={tfds}",),
    "pipeline.inspect": ("dataset.data_dir={tfds}",),
    "pipeline.predict": (),
}


def tiny_settings(command: Command) -> tuple[str, ...]:
    """What is appended to `command`: its `TINY_FOR` entry, else its entry point's `TINY`,
    less `debug=smoke` where the command picks its own debug mode."""
    if command.text in TINY_FOR:
        return TINY_FOR[command.text]
    tiny = TINY.get(command.entry_point, ())
    if any(word.startswith("debug=") for word in command.argv):
        tiny = tuple(t for t in tiny if t != "debug=smoke")
    return tiny


# Commands whose tiny settings differ from TINY, and why.
TINY_FOR = {
    # The quick start also registers its model: digits-mlp/1 @champion is what the
    # evaluate, inspect, reload and MLflow commands below use.
    "python -m pipeline.train": (*TINY["pipeline.train"], "mlflow.log_model=true"),
    # A reproduction refuses any other override; it reproduces a smoke run (REPRODUCE).
    "python -m pipeline.train reproduce=RUN_ID determinism=true": (),
    # A search of 20 (or 8) trials is one trial here: the same sweeper, study and parent run.
    "python -m pipeline.train hparams_search=optuna hydra.sweeper.n_trials=20":
        (*TINY["pipeline.train"], "hydra.sweeper.n_trials=1"),
    "python -m pipeline.train hparams_search=optuna hydra.sweeper.n_trials=8 trainer.epochs=6":
        (*TINY["pipeline.train"], "hydra.sweeper.n_trials=1"),
    # The sweeper's settings (n_trials, pruner, patience) are not part of the study's name: these
    # continue the n_trials=20 line's one-trial study. The prose's bare search finds it complete
    # at one trial and says so; hyperband runs a second trial, patience a third.
    "python -m pipeline.train hparams_search=optuna": (*TINY["pipeline.train"], "hydra.sweeper.n_trials=1"),
    "python -m pipeline.train hparams_search=optuna hydra.sweeper.n_trials=100 hydra.sweeper.patience=15":
        (*TINY["pipeline.train"], "hydra.sweeper.n_trials=3"),
    "python -m pipeline.train hparams_search=optuna hydra.sweeper.pruner=hyperband":
        (*TINY["pipeline.train"], "hydra.sweeper.n_trials=2"),
    # Your own data (`own_data_files` makes photos/ and wine.csv): one epoch, and the model
    # registered, for the pipeline.predict commands after them. A table has no data_dir.
    "python -m pipeline.train dataset=image_folder dataset.path=photos 'dataset.image_size=[64,64]' "
    "architecture=resnet augment=flip_crop": ("trainer.epochs=1",),
    "python -m pipeline.train dataset=csv dataset.path=wine.csv dataset.label=species 'dataset.drop=[id]'":
        ("trainer.epochs=1",),
    # The UI binds the README's default port 5000 otherwise, which another test may hold;
    # its default 4 workers cost 4 start-ups of the 2 cores for one request.
    "mlflow ui --backend-store-uri sqlite:///mlflow.db": ("--port", "{port}", "--workers", "1"),
}

# Run as typed in a fresh interpreter (plus their tiny settings): what a user's terminal
# does, including Hydra's logging and the process's exit code. The rest run in-process
# (each fresh interpreter costs ~15 s of TensorFlow start-up on 2 cores): evaluate and
# inspect run as typed in fresh interpreters in tests/test_cli.py (`python -m
# pipeline.evaluate model=models:/digits-mlp@champion`) and tests/test_summary.py (the
# closing block's commands), a sweep in tests/test_sweeps.py.
IN_SUBPROCESS = {
    "python -m pipeline.train",  # the quick start (the module's fixture runs it first)
    "mlflow ui --backend-store-uri sqlite:///mlflow.db",  # a server
}

# MLflow's own command line, run in this process through its click group (`mlflow.cli`).
MLFLOW_CLI = {"mlflow artifacts download -u models:/digits-mlp@champion/serving_input_example.json -d ."}

# A reproduction trains a run's recorded config again: here a smoke run that logged no
# model (the quick start's also exports and registers one).
REPRODUCE = "python -m pipeline.train reproduce=RUN_ID determinism=true"

# What a placeholder of the README stands for here: what the quick start made.
PLACEHOLDERS = {
    "RUN_ID": "{run_id}",
    # Version 3 is the README's example; the quick start registered version 1.
    "models:/digits-mlp/3": "models:/digits-mlp/1",
    # The session's tracking server (tests/mlflow_server.py), in place of the README's port 5000.
    "http://127.0.0.1:5000": "{server}",
}


@dataclass(frozen=True)
class Elsewhere:
    """Run by another test, which must still use `uses` (the command's arguments)."""

    test: str  # tests/FILE.py::FUNCTION (a test or the fixture that runs the command)
    uses: tuple[str, ...]
    why: str


ELSEWHERE = {
    "pip install -e '.[dev]'": Elsewhere(
        ".ci/run", ("pip install -e '.[dev]'",),
        "CI installs the dev extras before it runs the suite; reinstalling from inside the "
        "suite would change the environment under the other worker"),
    "pytest": Elsewhere(".ci/run", ("pytest",), "the suite itself: CI runs exactly this command"),
    "mlflow models predict -m models:/digits-mlp@champion -i serving_input_example.json --env-manager local":
        Elsewhere("tests/test_registry.py::test_mlflow_models_predict_takes_the_input_example",
                  ('"models", "predict"', "serving_input_example.json", '"--env-manager", "local"'),
                  "loads TensorFlow in a third process; test_registry predicts with the champion's "
                  "downloaded example"),
    "mlflow models serve -m models:/digits-mlp@champion --env-manager local --host 127.0.0.1 --port 5001":
        Elsewhere("tests/test_registry.py::serve",
                  ('"models", "serve"', '@champion"', '"--env-manager", "local", "--host", "127.0.0.1", "--port"'),
                  "a server that takes ~40 s to load its model; test_registry serves both champions "
                  "once, on a free port"),
    "curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d @serving_input_example.json":
        Elsewhere("tests/test_registry.py::invoke", ('/invocations"', 'json={"inputs": inputs}'),
                  "needs the served model above; test_registry posts the same body"),
    "mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow-server.db "
    "--artifacts-destination ./mlartifacts": Elsewhere(
        "tests/mlflow_server.py::start_mlflow_server",
        ('"mlflow", "server"', '"--host", "127.0.0.1"', '"--backend-store-uri"', '"--artifacts-destination"'),
        "the session's tracking server, with these flags on a free port"),
    "MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python -m pipeline.train mlflow=server": Elsewhere(
        "tests/mlflow_server.py::server_run", ('"mlflow=server"', '{"MLFLOW_TRACKING_URI": mlflow_server}'),
        "the session's run against its tracking server, made once for the tests that read it back"),
    "python -m pipeline.train mlflow=server": Elsewhere(
        "tests/mlflow_server.py::server_run", ('"pipeline.train", "mlflow=server"',),
        "the same run as above"),
    "python -m pipeline.train architecture=multi_io dataset=synthetic_multimodal": Elsewhere(
        "tests/test_architecture_runs.py::test_multi_io_trains_and_reloads_without_project_code",
        ('"architecture=multi_io", "dataset=synthetic_multimodal"',),
        "preparing synthetic_multimodal costs seconds; that test trains it and reloads its model"),
    "python -m pipeline.train -m hydra/launcher=joblib hydra.launcher.n_jobs=2 mlflow=server "
    "architecture=mlp,functional": Elsewhere(
        "tests/test_sweeps.py::test_joblib_launcher_in_parallel_against_a_tracking_server",
        ('"-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "mlflow=server"', '"architecture=mlp,functional"'),
        "two joblib workers each start TensorFlow, against the session's tracking server"),
    "python -m pipeline.train -m architecture=mlp,functional optimizer.lr=1e-3,1e-2": Elsewhere(
        "tests/test_sweeps.py::test_grid_with_basic_launcher",
        ('"-m", "architecture=mlp,functional", "optimizer.lr=1e-3,1e-2"',),
        "run there, as typed, in a fresh interpreter; it also reads the parent, children and summary back"),
    "python -m pipeline.train -m 'experiment=glob(*,exclude=cifar10_*)' debug=smoke": Elsewhere(
        "tests/test_sweeps.py::test_every_experiment_preset_in_smoke_mode",
        ('"-m", "experiment=glob(*,exclude=cifar10_*)", "debug=smoke"',),
        "run there, as typed, in a fresh interpreter"),
    "python -m pipeline.train debug=overfit": Elsewhere(
        "tests/test_sweeps.py::test_overfit_mode_drives_the_loss_to_zero", ('"debug=overfit"',),
        "that test also checks the loss reaches ~0"),
    "python -m pipeline.evaluate model=models:/digits-mlp@champion dataset=synthetic_mnist": Elsewhere(
        "tests/test_bad_input.py",
        ('"pipeline.evaluate", "model=models:/digits-mlp@champion", "dataset=synthetic_mnist"',),
        "preparing synthetic_mnist costs seconds: the bad-input table runs it in-process against the session's "
        "registered digits-mlp"),
    "python -m pipeline.train dataset.inject_nan_at_step=50": Elsewhere(
        "tests/test_fault_tolerance.py::test_injected_nan_is_caught_at_its_step_and_never_applied",
        ('"dataset.inject_nan_at_step=50"',),
        "step 50 is in the second epoch, beyond any tiny setting; that test also checks the "
        "step is never applied and the last checkpoint precedes it"),
    "python -m pipeline.train debug=profile": Elsewhere(
        "tests/test_profile.py::test_debug_profile_logs_a_trace_and_its_top_ops", ('"debug=profile"',),
        "its trace starts after 48 steps; that test profiles fewer steps and reads the trace back"),
    "python -m pipeline.train resume=RUN_ID": Elsewhere(
        "tests/test_fault_tolerance.py::test_kill_9_then_resume_continues_the_same_run_exactly",
        ('"pipeline.train", f"resume={run.info.run_id}"',), "needs a run killed mid-training: that test kills one"),
    "python -m pipeline.train resume=last trainer.epochs=30": Elsewhere(
        "tests/test_fault_tolerance.py::test_sigterm_saves_marks_killed_and_resume_last_finishes",
        ('"pipeline.train", "resume=last"',),
        "needs an unfinished run: that test stops one with SIGTERM (raising epochs on resume: "
        "test_corrupt_latest_checkpoint_falls_back_to_the_previous)"),
    "python -m pipeline.train distribution=mirrored distribution.logical_cpus=2": Elsewhere(
        "tests/test_distribution.py::test_mirrored_over_two_logical_cpus_matches_one_device",
        ('"distribution=mirrored", "distribution.logical_cpus=2"',),
        "logical CPUs must be set before TensorFlow starts, so not in this process"),
    "python -m pipeline.cluster --workers 2 -- architecture=mlp trainer.epochs=5": Elsewhere(
        "tests/test_distribution.py::test_two_workers_make_one_run_with_identical_weights",
        ('"pipeline.cluster", "--workers", "2", "--"',), "two worker processes, each starting TensorFlow"),
}

NOT_RUN = {
    "pip install -e .": "installs the project; the suite runs from that install, and reinstalling "
                        "would change the environment under the other worker",
    "pip install mlflow psycopg2-binary boto3": "a server host's set-up, from the package index",
    "export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...": "credentials of an S3 store",
    "export MLFLOW_S3_ENDPOINT_URL=https://minio.internal:9000": "names a host on another network",
    "mlflow server --host 10.0.0.5 --port 5000 --backend-store-uri "
    "postgresql+psycopg2://user:pass@db.internal/mlflow --artifacts-destination s3://bucket/path "
    "--allowed-hosts 'mlflow.internal,10.0.0.5:5000'":
        "needs a PostgreSQL host and an S3 store on a network (a sweep into an mlflow server on a "
        "local PostgreSQL is tests/test_scale_sweeps.py)",
    "pip install -e '.[profile]'": "installs an optional extra (TensorBoard) from the package index",
    "mlflow artifacts download -r RUN_ID -a profile -d /tmp/trace":
        "needs a debug=profile run's trace (tests/test_profile.py makes one and reads its profile/ "
        "artifact back); and it writes outside the test's directory",
    "tensorboard --logdir /tmp/trace/profile": "a server for a browser, from an optional extra",
    "optuna-dashboard sqlite:///optuna.db": "a server for a browser, from an optional extra; "
                                            "tests/test_optuna_search.py::test_optuna_dashboard_opens_the_study_the_"
                                            "closing_block_names starts it on a study and reads it back",
    # Lines of the SLURM batch script in docs/scale-out.md: a cluster's shared filesystem.
    "source /shared/venv/bin/activate": "activates a virtual environment on a cluster's shared filesystem",
    "cd /shared/tf-hydra-mlflow-pipeline": "a checkout on a cluster's shared filesystem",
    "python -m pipeline.train mlflow=server mlflow.tracking_uri=http://10.0.0.5:5000":
        "names a server on another machine",
    "export MLFLOW_TRACKING_URI=http://10.0.0.5:5000": "names a server on another machine",
    "python -m pipeline.train -m hydra/launcher=slurm mlflow=server hydra.launcher.partition=gpu "
    "hydra.launcher.gpus_per_node=1 architecture=mlp,resnet optimizer.lr=1e-3,1e-2":
        "needs a SLURM cluster (sbatch) and a shared server; the preset composes and builds its "
        "launcher in tests/test_scale_sweeps.py",
    "python -m pipeline.train hparams_search=optuna hydra.sweeper.storage=postgresql+psycopg2://user@db/optuna":
        "needs a PostgreSQL server at host db",
    "python -m pipeline.train hparams_search=optuna hydra.sweeper.storage=journal:///shared/dir/study.log":
        "a journal on a cluster's shared filesystem; tests/test_optuna_search.py runs searches on a journal file",
    "python -m pipeline.train hparams_search=optuna mlflow=server hydra.sweeper.storage=journal:///shared/optuna/"
    "digits.log hydra.sweeper.n_trials=64 dataset.data_dir=/shared/tensorflow_datasets "
    "hydra.sweep.dir=/shared/outputs/digits-search/task-${SLURM_ARRAY_TASK_ID}":
        "a SLURM array task's command, on a cluster's shared filesystem and tracking server",
    "python -m pipeline.train hparams_search=optuna hydra/launcher=joblib hydra.launcher.n_jobs=2 "
    "hydra.sweeper.n_jobs=2": "two joblib workers each start TensorFlow (~40 s of the 2 cores); the "
                              "joblib launcher under this sweeper is tests/test_optuna_search.py's "
                              "test_a_trial_in_a_joblib_worker_is_pruned_through_the_storage",
    "TF_CONFIG='{\"cluster\": {\"worker\": [\"10.0.0.1:2222\", \"10.0.0.2:2222\"]}, \"task\": "
    "{\"type\": \"worker\", \"index\": 0}}' python -m pipeline.train distribution=multi_worker":
        "a worker of a cluster on two other machines (pipeline.cluster runs the same on loopback)",
    # Synopses in the prose, not commands: their concrete forms are run above.
    "python -m pipeline.evaluate model=URI [dataset=NAME] [split=test]": "a synopsis",
    "python -m pipeline.train -m ... +sweep.resume=PARENT_RUN_ID": "a synopsis (tests/test_sweep_resume.py)",
    "python -m pipeline.train distribution=multi_worker ...": "a synopsis",
    "python -m pipeline.cluster --workers N -- OVERRIDES...": "a synopsis",
    "python -m pipeline.evaluate model=...": "a synopsis",
    "python -m pipeline.train architecture=NAME": "a synopsis (every family: tests/test_architecture_runs.py)",
    "python -m pipeline.train dataset=tfds dataset.name=tf_flowers 'dataset.image_size=[128,128]'":
        "needs tf_flowers prepared, which needs network; dataset=tfds on a prepared dataset is "
        "tests/test_own_data.py::test_any_prepared_tfds_dataset_by_name",
    "python -m pipeline.train experiment=cifar10_resnet": "needs CIFAR-10 prepared, which needs network; the "
                                                           "recipe runs on digits in tests/test_sweeps.py",
}


def runs_here(command: Command) -> bool:
    return command.text in IN_SUBPROCESS | MLFLOW_CLI or (
        command.entry_point is not None and command.text not in ELSEWHERE and command.text not in NOT_RUN)


# Commands that name the README's tracking server on port 5000 run against the session's
# server instead (`test_evaluate_against_a_tracking_server`).
SERVER_COMMANDS = [c for c in COMMANDS if "http://127.0.0.1:5000" in c.text and runs_here(c)]
RUN_HERE = [c for c in COMMANDS if runs_here(c) and c not in SERVER_COMMANDS]


def test_every_command_has_exactly_one_disposition() -> None:
    texts = {c.text for c in COMMANDS}
    assert texts, "no command found in README.md"
    undecided = [f"{c.where}: {c.text}" for c in COMMANDS
                 if not runs_here(c) and c.text not in ELSEWHERE and c.text not in NOT_RUN]
    assert not undecided, ("commands this test neither runs nor lists (add them to ELSEWHERE or NOT_RUN "
                           "with a reason, or make them runnable):\n" + "\n".join(undecided))
    for table in (IN_SUBPROCESS, MLFLOW_CLI, ELSEWHERE, NOT_RUN, TINY_FOR):
        gone = sorted(set(table) - texts)
        assert not gone, f"no longer in README.md or docs/, so drop them from the table: {gone}"
    assert not set(ELSEWHERE) & set(NOT_RUN) and not set(IN_SUBPROCESS) & (set(ELSEWHERE) | set(NOT_RUN))
    for command in RUN_HERE:  # what stays a placeholder cannot run
        text = substitute(command.text, {"run_id": "x", "server": "x"})
        leftover = [word for word in re.findall(r"\b[A-Z][A-Z_]{2,}\b", text) if word not in command.env]
        assert not leftover, f"{command.where}: placeholders {leftover} in {command.text}"


@pytest.mark.parametrize("text", sorted(ELSEWHERE), ids=lambda text: text[:60])
def test_the_test_that_runs_it_still_does(text: str) -> None:
    elsewhere = ELSEWHERE[text]
    path, _, name = elsewhere.test.partition("::")
    source = (REPO / path).read_text()
    if not path.endswith(".py"):  # a shell script
        assert all(use in source for use in elsewhere.uses), f"{path} no longer runs `{text}`"
        return
    if name:
        (function,) = [node for node in ast.walk(ast.parse(source))
                       if isinstance(node, ast.FunctionDef) and node.name == name]
        source = ast.get_source_segment(source, function)
    missing = [use for use in elsewhere.uses if use not in source]
    assert not missing, f"{elsewhere.test} no longer uses {missing}: it no longer runs `{text}`"
    # The output the README shows under its prompt is what that test expects, word for word.
    (command,) = {c.text: c for c in COMMANDS if c.text == text}.values()
    expected = [line.removeprefix("error: ") for line in command.expected]
    strings = {node.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Constant)}
    assert all(line in strings for line in expected), f"{elsewhere.test} expects other output than {expected}"


# -- running them ----------------------------------------------------------------------


def substitute(text: str, values: dict[str, str]) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value.format(**values))
    return text


def arguments(argv: list[str], tiny: tuple[str, ...]) -> list[str]:
    """`argv` with `tiny` appended to its overrides: Hydra takes its overrides in one
    run, before or after its flags (`--cfg job`), not on both sides."""
    flags, overrides, words = [], [], iter(argv)
    for word in words:
        if word.startswith("-"):
            flags.append(word)
            if word in ("--cfg", "-c", "--package", "-p", "--info", "-i"):
                flags.append(next(words))
        else:
            overrides.append(word)
    return [*flags, *overrides, *tiny]


@dataclass(frozen=True)
class QuickStart:
    directory: Path  # the launch directory: mlflow.db, mlruns/, outputs/
    result: subprocess.CompletedProcess
    run_id: str


@pytest.fixture(scope="module")
def quick_start(tfds_dir: str, tmp_path_factory: pytest.TempPathFactory, empty_mlflow_db: Path) -> QuickStart:
    """The README's quick start, as typed plus its tiny settings, in a new directory: it
    trains and registers digits-mlp/1 @champion in ./mlflow.db, for the commands after it."""
    directory = tmp_path_factory.mktemp("readme")
    new_mlflow_store(directory, empty_mlflow_db)
    (command,) = [c for c in COMMANDS if c.text == "python -m pipeline.train"]
    tiny = [t.format(tfds=tfds_dir) for t in TINY_FOR[command.text]]
    result = run_module("pipeline.train", *arguments(command.argv[3:], tuple(tiny)), cwd=directory)
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"^run +\S+ \(([0-9a-f]{32})\)$", result.stdout, re.M)
    assert match, result.stdout[-3000:]
    return QuickStart(directory, result, match.group(1))


def own_data_files(directory: Path) -> None:
    """What the own-data commands read, in the quick start's directory: photos/ (three
    classes of mixed formats), wine.csv, and new files to predict (new_photos/, new_wines.csv)."""
    if (directory / "photos").exists():
        return
    make_image_folder(directory / "photos", per_class=20, bad_file=False)
    (directory / "new_photos").mkdir()
    for path in sorted((directory / "photos").rglob("*.png"))[::6]:
        shutil.copy(path, directory / "new_photos" / f"{path.parent.name}_{path.name}")
    wine = write_table(directory / "wine.csv", missing_cell=False)
    (directory / "new_wines.csv").write_text("\n".join(line.rsplit(",", 1)[0]
                                                       for line in wine.read_text().splitlines()[:30]) + "\n")


@pytest.fixture
def in_quick_start_dir(quick_start: QuickStart, monkeypatch: pytest.MonkeyPatch) -> QuickStart:
    """The quick start's directory as the working directory, its ./mlflow.db the store."""
    import mlflow

    own_data_files(quick_start.directory)
    monkeypatch.chdir(quick_start.directory)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sys, "argv", sys.argv)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    yield quick_start
    mlflow.set_tracking_uri(previous)


def check_outcome(command: Command, code: int, out: str, err: str) -> None:
    """Success, or, under a `$ ` prompt, the README's `error:` line and a non-zero exit."""
    if not command.expected:
        assert code == 0, f"{command.where}: `{command.text}` exited {code}\n{err[-3000:]}"
        return
    assert code != 0, f"{command.where}: `{command.text}` succeeded; the page shows a failure"
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    expected = [line for line in command.expected if line.startswith("error: ")]
    assert errors[-1:] == expected, (command.where, err[-3000:])


@pytest.mark.slow
@pytest.mark.parametrize("command", RUN_HERE, ids=lambda c: f"{c.where}:{c.text[:70]}")
def test_readme_command(command: Command, in_quick_start_dir: QuickStart, tfds_dir: str,
                        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    here = in_quick_start_dir
    if command.text == "python -m pipeline.train":  # ran in the fixture, as typed
        client = MlflowClient("sqlite:///mlflow.db")
        run = client.get_run(here.run_id)
        assert run.info.status == "FINISHED" and (here.directory / "mlruns").is_dir()
        assert client.get_model_version_by_alias("digits-mlp", "champion").run_id == here.run_id
        return
    run_id = newest_run_without_model(here) if command.text == REPRODUCE else here.run_id
    values = {"run_id": run_id, "tfds": tfds_dir, "port": str(free_port()), "server": ""}
    text = substitute(command.text, values)
    tiny = [t.format(**values) for t in tiny_settings(command)]
    argv = Command(text, command.line, page=command.page).argv
    if command.text.startswith("mlflow ui"):
        ui_answers(argv[2:] + tiny, here.directory)
    elif command.text in IN_SUBPROCESS:
        result = run_module(command.entry_point, *arguments(argv[3:], tuple(tiny)), cwd=here.directory)
        check_outcome(command, result.returncode, result.stdout, result.stderr)
        check_output(command, result.stdout + result.stderr, here)
    elif command.text in MLFLOW_CLI:
        from mlflow.cli import cli

        cli.main(args=[*argv[1:], *tiny], prog_name="mlflow", standalone_mode=False)  # raises on failure
        check_output(command, "", here)
    else:
        for name, value in command.env.items():
            monkeypatch.setenv(name, value)
        code, out, err = run_in_process(command.entry_point, arguments(argv[3:], tuple(tiny)), capsys)
        check_outcome(command, code, out, err)
        check_output(command, out + err, here)


def newest_run_without_model(here: QuickStart) -> str:
    """The newest finished run of a single smoke job (no sweep, no model) in the store,
    else the quick start's run (when this test runs alone)."""
    client = MlflowClient("sqlite:///mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id],
                              "tags.debug = 'smoke' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    return next((run.info.run_id for run in runs if "architecture" in run.data.tags  # not a sweep's parent
                 and "mlflow.parentRunId" not in run.data.tags and run.info.run_id != here.run_id), here.run_id)


def check_output(command: Command, output: str, here: QuickStart) -> None:
    """What some commands are for, beyond exiting 0."""
    if command.entry_point == "pipeline.inspect":
        for layer in ("dense_1", "dense_2"):  # the default mlp's real layer names
            assert re.search(rf"^\s*{layer}\b", output, re.M), output[-3000:]
    elif command.entry_point == "pipeline.evaluate":
        assert re.search(r"models:/digits-mlp(@champion|/1) on digits\[(test|train\[:10%\])\]", output), output[-3000:]
    elif "--cfg job" in command.text:
        assert "architecture:" in output and "optimizer:" in output
    elif "--help" in command.text:
        assert "python -m pipeline.train [group=option] [key=value]" in output
    elif command.entry_point == "pipeline.predict":
        match = re.search(r"^(\d+) predictions by \S+ written to (\S+)$", output, re.M)
        assert match and int(match.group(1)) > 0, output[-3000:]
        header = Path(match.group(2)).read_text().splitlines()[0]
        assert header.startswith("input,prediction,probability,"), header
    elif command.text.startswith("mlflow artifacts download"):
        assert '"inputs"' in (here.directory / "serving_input_example.json").read_text()


def ui_answers(args: list[str], directory: Path) -> None:
    """`mlflow ui ARGS` starts and answers `GET /health` (10-15 s, longer under load)."""
    port = args[args.index("--port") + 1]
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", *args], cwd=directory,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               start_new_session=True,  # its own group: stopping it reaches its workers
                               env={**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
                                    # no GenAI job runner (an extra huey consumer process) to answer /health
                                    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        # Its stderr is read once it has exited; reading a running process's pipe would block.
        wait_until_answers(f"http://127.0.0.1:{port}/health", process, 120,
                           lambda: process.stderr.read()[-3000:] if process.poll() is not None else "")
    finally:
        stop_process_group(process)
        process.stderr.close()


@pytest.mark.slow
def test_python_blocks_reload_the_champion(in_quick_start_dir: QuickStart) -> None:
    """Each ```python block of the README and docs/ runs as written, in the quick start's
    directory, once its placeholder `raw_uint8_images` is a few raw digits."""
    from sklearn.datasets import load_digits

    raw_uint8_images = np.round(load_digits().images[:5] * 255 / 16).astype(np.uint8)[..., None]  # (5, 8, 8, 1)
    blocks = [(path, block) for path in DOCUMENTS
              for block in re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M)]
    assert blocks
    for path, block in blocks:
        namespace = {"raw_uint8_images": raw_uint8_images}
        exec(compile(block, str(path), "exec"), namespace)  # noqa: S102  (the page's own example)
        probabilities = np.asarray(namespace["probabilities"])
        assert probabilities.shape == (5, 10) and probabilities.dtype == np.float32  # as its comment says


@pytest.mark.slow
@pytest.mark.parametrize("command", SERVER_COMMANDS, ids=lambda c: f"{c.where}:{c.text[:70]}")
def test_evaluate_against_a_tracking_server(command: Command, server_run, mlflow_server: str, tfds_dir: str,
                                            capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    """Against the session's server and its run's champion (`server_run`); `log_run=false`
    leaves the shared server's store as it was."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv)
    text = substitute(command.text, {"server": mlflow_server, "run_id": ""})
    for name, value in Command(text, command.line).env.items():
        monkeypatch.setenv(name, value)
    argv = Command(text, command.line).argv
    code, out, err = run_in_process(command.entry_point,
                                    arguments(argv[3:], (f"dataset.data_dir={tfds_dir}", "log_run=false")), capsys)
    check_outcome(command, code, out, err)
    assert "models:/digits-mlp@champion on digits[test]" in out


# -- counts and output the pages quote ----------------------------------------------------


def test_counts_the_readme_quotes_are_the_tables_they_count() -> None:
    # The table is read, not imported: a test module imports no other test module.
    (table,) = [node.value for node in ast.parse((REPO / "tests" / "test_bad_input.py").read_text()).body
                if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["BAD_INPUTS"]]
    text = " ".join(" ".join(path.read_text() for path in DOCUMENTS).split())
    assert f"`tests/test_bad_input.py` keeps a table of {len(table.elts)} such cases" in text


@pytest.mark.slow
def test_the_closing_block_shown_is_the_one_printed(quick_start: QuickStart) -> None:
    """The quick start's example output has the rows, in the order, a run prints."""
    (shown,) = re.findall(r"^```text\n(run .*?)^```", README.read_text(), re.S | re.M)
    *_, start = re.finditer(r"^run +\S+ \([0-9a-f]{32}\)$", quick_start.result.stdout, re.M)
    printed = quick_start.result.stdout[start.start():]
    labels = [re.split(r"\s{2,}", line)[0] for line in shown.splitlines()]
    assert labels == [re.split(r"\s{2,}", line)[0] for line in printed.strip().splitlines()][:len(labels)], printed


def anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_resolve() -> None:
    """Every relative link of the README and docs/ names a page that exists and, after `#`,
    one of its headings."""
    broken = []
    for path in DOCUMENTS:
        text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+://", target):
                continue
            file, _, fragment = target.partition("#")
            page = (path.parent / file).resolve() if file else path
            text_of_page = page.read_text() if page.is_file() else ""
            headings = {anchor(heading) for heading in re.findall(r"^#+ (.*)$", text_of_page, re.M)}
            if not page.is_file() or (fragment and fragment not in headings):
                broken.append(f"{path.relative_to(REPO)}: ({target})")
    assert not broken, "links to no page or heading:\n" + "\n".join(broken)
