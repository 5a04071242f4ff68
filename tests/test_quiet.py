"""pipeline.quiet: TensorFlow's CUDA probing is hidden on a CPU-only machine, and nothing else is.

Without it, every run here starts with lines that read like a failure:
    E0000 00:00:1796161746.319079   19237 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: ...
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_module

from pipeline import quiet, stderr_filter

REPO = Path(__file__).resolve().parents[1]

# As TensorFlow 2.21 writes them to fd 2 on this kind of machine.
PREAMBLE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
ONEDNN = (b"I0000 00:00:1796161741.272731   19237 port.cc:153] oneDNN custom operations are on. You may see "
          b"slightly different numerical results due to floating-point round-off errors.\n")
NO_DRIVERS = (b"I0000 00:00:1796161741.274464   19237 cudart_stub.cc:31] Could not find cuda drivers on your "
              b"machine, GPU will not be used.\n")
CUINIT = (b"E0000 00:00:1796161746.319079   19237 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA "
          b"error: Failed call to cuInit: UNKNOWN ERROR (303)\n")
CACHE_WARNING = (b"W0000 00:00:1796161980.373990   24334 cache_dataset_ops.cc:912] The calling iterator did not "
                 b"fully read the dataset being cached.\n")


def test_cuda_probing_is_dropped_and_everything_else_forwarded(capfd: pytest.CaptureFixture) -> None:
    # capfd makes fd 2 a file: the filter writes to whatever fd 2 was.
    with quiet.filtered_stderr(drop_info=True):
        os.write(2, PREAMBLE + ONEDNN + NO_DRIVERS)  # the import, as TensorFlow 2.21 says it twice
        os.write(2, PREAMBLE + ONEDNN + NO_DRIVERS)
        os.write(2, CUINIT)  # the first device listing
        os.write(2, b"a line of a program started meanwhile\n")
        os.write(2, PREAMBLE + NO_DRIVERS + CACHE_WARNING)  # a preamble introducing a real warning stays
        os.write(2, b"no newline at the end")
    assert capfd.readouterr().err == ("a line of a program started meanwhile\n" + (PREAMBLE + CACHE_WARNING).decode()
                                      + "no newline at the end")
    os.write(2, CUINIT)  # fd 2 is itself again: nothing filtered any more
    assert capfd.readouterr().err == CUINIT.decode()


def test_info_lines_are_kept_unless_tensorflow_was_asked_to_hide_them(capfd: pytest.CaptureFixture) -> None:
    with quiet.filtered_stderr(drop_info=False):  # TF_CPP_MIN_LOG_LEVEL=0
        os.write(2, PREAMBLE + ONEDNN + NO_DRIVERS + CUINIT)
    assert capfd.readouterr().err == (PREAMBLE + ONEDNN).decode()


def test_stderr_is_restored_when_the_block_raises(capfd: pytest.CaptureFixture) -> None:
    with pytest.raises(RuntimeError, match="boom"), quiet.filtered_stderr(drop_info=True):
        os.write(2, b"before\n" + CUINIT)
        raise RuntimeError("boom")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "before\nafter\n"


def test_what_an_aborting_process_wrote_still_reaches_stderr() -> None:
    # A fatal TensorFlow check aborts the process inside the block: the filter, a process
    # of its own, still forwards the last words (through a pipe here, as in a subprocess).
    code = ("import os\nfrom pipeline import quiet\nwith quiet.filtered_stderr(drop_info=True):\n"
            "    os.write(2, b'F0000 00:00:1.2   7 op.cc:1] Check failed: fatal\\n')\n    os.abort()\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert result.stderr == "F0000 00:00:1.2   7 op.cc:1] Check failed: fatal\n"


@pytest.mark.parametrize(("environ", "nvidia_driver", "filtered"), [
    ({}, False, True),  # a CPU-only machine: CUDA's probing finds nothing, as expected
    ({}, True, False),  # a GPU machine: a CUDA failure there is news
    ({"CUDA_VISIBLE_DEVICES": "0"}, True, False),
    ({"CUDA_VISIBLE_DEVICES": ""}, True, True),  # GPUs hidden on purpose: CUDA finds none, as asked
    ({"CUDA_VISIBLE_DEVICES": "-1"}, True, True),
    ({"PIPELINE_SHOW_TF_INIT": "1"}, False, False),  # asked to show everything
    ({"PIPELINE_SHOW_TF_INIT": "0"}, False, True),
])
def test_filtering_is_off_on_request_and_where_a_gpu_is_expected(environ, nvidia_driver, filtered) -> None:
    assert quiet.filtering_wanted(environ, nvidia_driver) is filtered


def test_a_first_run_on_a_cpu_machine_prints_no_false_alarms(mlflow_store: str, tmp_path: Path) -> None:
    # No TF_CPP_MIN_LOG_LEVEL of the test's: the user's default (pipeline.cli sets 1). CUDA_VISIBLE_DEVICES="":
    # no GPU is expected, so this runs as on a CPU-only machine even where a GPU is (which probes all the same).
    result = run_module("pipeline.train", "debug=smoke", f"dataset.data_dir={tmp_path / 'fresh_tfds'}",
                        f"mlflow.tracking_uri={mlflow_store}", cwd=tmp_path,
                        env={"TF_CPP_MIN_LOG_LEVEL": "1", "CUDA_VISIBLE_DEVICES": "", "PIPELINE_SHOW_TF_INIT": "0"},
                        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for noise in ["cuInit", "cuda", "absl::InitializeLog", "oneDNN", "Generating splits"]:
        assert noise not in result.stderr, result.stderr
    for noise in ["Downloading and preparing dataset", "downloaded and prepared", "Variant folder"]:
        assert noise not in result.stdout, result.stdout
    assert (f"[pipeline.datasets][INFO] - preparing dataset digits (offline, from scikit-learn's bundled data) "
            f"in {tmp_path / 'fresh_tfds' / 'digits' / '1.0.0'}") in result.stdout


def test_a_benchmarks_help_prints_no_cuda_probing() -> None:
    # Every `python -m benchmarks.NAME` imports the package first (benchmarks/__init__.py),
    # which imports TensorFlow through pipeline.quiet: what callbacks_overhead shows, all show.
    # CUDA_VISIBLE_DEVICES="": no GPU is expected, even on a machine with one (where it probes all the same).
    result = subprocess.run([sys.executable, "-m", "benchmarks.callbacks_overhead", "--help"], cwd=REPO,
                            capture_output=True, timeout=120,
                            env={**os.environ, "PIPELINE_SHOW_TF_INIT": "0", "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0 and result.stdout.startswith(b"usage: "), result.stderr[-3000:]
    assert not stderr_filter.CUDA_PROBING.search(result.stderr), result.stderr.decode()


def test_tensorflow_retracing_warning_is_dropped_from_a_process_second_run_only(monkeypatch, caplog):
    """A sweep's later jobs each compile new functions from the same code, which
    TensorFlow reports as retracing; a process's first run still shows the warning."""
    import logging

    tensorflow_logger = logging.getLogger("tensorflow")
    retracing = ("5 out of the last 5 calls to <function GuardedModel.make_train_function.<locals>.execution at "
                 "0x7fa93180e8e0> triggered tf.function retracing. Tracing is expensive ...")
    monkeypatch.setattr(quiet, "_runs", 0)
    monkeypatch.setattr(quiet._dropped, "fragments", set())  # as in a new process
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        quiet.count_run()
        tensorflow_logger.warning(retracing)  # first run: a real retracing problem, shown
        quiet.count_run()
        tensorflow_logger.warning(retracing)  # second run: dropped
        tensorflow_logger.warning("Skipping variable loading for optimizer 'adam'")  # any other: kept
    assert [r.getMessage() for r in caplog.records if r.name == "tensorflow"] == [
        retracing, "Skipping variable loading for optimizer 'adam'"]
    assert tensorflow_logger.filters.count(quiet._dropped) == 1  # installed once
