"""The checkpoints of one training run on disk (`callbacks.checkpoint.Checkpointing`
decides what goes in them and when).

`NumberedCheckpoints` writes `directory/ckpt-N`, keeps the newest few and lists them in
the `checkpoint` index file, as `tf.train.CheckpointManager` does, with one compiled call
per write; `latest_readable` finds the newest checkpoint whose every tensor reads back,
and `read_all` restores from one, failing clearly when it holds another model's state;
`hold` keeps a second process from training into the same directory.
TensorFlow writes a checkpoint's files under a temporary name; then the index file
moves to it with an atomic rename, so a kill mid-write leaves the previous checkpoint
as the latest.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from pathlib import Path
from typing import IO

import tensorflow as tf

from pipeline import quiet
from pipeline.errors import PipelineError, one_line

log = logging.getLogger(__name__)


class NumberedCheckpoints:
    """Checkpoints `directory/ckpt-N` of `root`, each written by one compiled call; the
    newest `keep` are kept and listed in the `checkpoint` index file that
    `tf.train.latest_checkpoint` and `tf.train.get_checkpoint_state` read (as
    `tf.train.CheckpointManager` keeps them, checkpoints already there included)."""

    def __init__(self, root: tf.train.Checkpoint, directory: str, keep: int) -> None:
        self.directory = directory
        self.keep = keep
        state = tf.train.get_checkpoint_state(directory)
        self.paths: list[str] = list(state.all_model_checkpoint_paths) if state else []
        # Traced once: the object graph is fixed, so each call only reads and writes tensors.
        self._write = tf.function(lambda prefix: root.write(prefix), autograph=False)

    @property
    def latest_checkpoint(self) -> str | None:
        return self.paths[-1] if self.paths else None

    def save(self, number: int) -> str:
        path = os.path.join(self.directory, f"ckpt-{number}")
        tf.io.gfile.makedirs(self.directory)  # a non-chief worker's scratch copy is deleted after each save
        self._write(tf.constant(path))
        self.paths = [p for p in self.paths if p != path] + [path]
        stale, self.paths = self.paths[:-self.keep], self.paths[-self.keep:]
        self._write_index()  # moved to the new checkpoint before the oldest goes
        for old in stale:
            for file in tf.io.gfile.glob(f"{old}.*"):
                tf.io.gfile.remove(file)
        return path

    def _write_index(self) -> None:
        """The `checkpoint` file (a text `CheckpointState`, paths relative to the
        directory, as `tf.train.CheckpointManager` writes it), replaced atomically."""
        names = [os.path.basename(p) for p in self.paths]
        text = "".join([f'model_checkpoint_path: "{names[-1]}"\n',
                        *(f'all_model_checkpoint_paths: "{name}"\n' for name in names)])
        index = os.path.join(self.directory, "checkpoint")
        with tf.io.gfile.GFile(f"{index}.tmp", "w") as file:
            file.write(text)
        tf.io.gfile.rename(f"{index}.tmp", index, overwrite=True)


def latest_readable(directory: str) -> str | None:
    """The newest checkpoint whose every tensor reads back; older ones are tried
    after a warning. None if there are none at all."""
    state = tf.train.get_checkpoint_state(directory)
    candidates = list(reversed(state.all_model_checkpoint_paths)) if state else []
    for path in candidates:
        try:
            reader = tf.train.load_checkpoint(path)
            for name in reader.get_variable_to_shape_map():
                reader.get_tensor(name)
            return path
        except Exception as error:  # OpError, or IndexError/ValueError from a truncated file
            log.warning("checkpoint %s is unreadable (%s); falling back to the one before it", path,
                        one_line(error, 200))
    if candidates:
        raise PipelineError(f"every checkpoint in {directory} is unreadable "
                            f"({', '.join(Path(p).name for p in candidates)}); cannot resume")
    return None


def by_path(variables) -> dict:
    """Variables keyed by their Keras path (made unique by position where paths repeat)."""
    keyed = {}
    for index, variable in enumerate(variables):
        key = variable.path if variable.path not in keyed else f"{variable.path}#{index}"
        keyed[key] = variable
    return keyed


def read_all(checkpoint: tf.train.Checkpoint, path: str) -> None:
    """Restore every variable of `checkpoint` from `path`, or fail naming the mismatch
    (e.g. a checkpoint another architecture, or an older version of this code, wrote).
    The checkpoint is left as it is either way."""
    try:
        status = checkpoint.read(path)
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as error:  # e.g. a variable's dtype differs
        reason = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\]", "", one_line(error, 400))
    else:
        status.expect_partial()  # the rest of the checkpoint (metrics, callbacks) is read later
        return
    # What the failed read left unrestored, TensorFlow lists when those objects are freed
    # (often at exit), one WARNING per value: the error says what matters, once. (Raised
    # here, not in `except`, so that the error does not keep the failed read alive.)
    quiet.drop_tensorflow_warnings("deleted with unrestored values", "could not be found in the restored")
    raise PipelineError(f"checkpoint {path} does not hold this model's training state: another model or another "
                        f"version of the pipeline wrote it ({reason}). It is left as it was; train a new run, or "
                        "resume with the version that wrote it")


def hold(directory: Path, remedy: str) -> IO[str]:
    """An exclusive lock on `directory` for this process (`flock` on `directory/.lock`,
    which names the holder), until the returned file is closed. Two processes training
    into one directory (`resume=` of a run that is still training, the same run resumed
    twice, two runs given one `callbacks.checkpoint.directory`) would overwrite each
    other's checkpoints and log each step twice: the second is refused. The kernel drops
    the lock when its holder ends, kill -9 included, so a crashed run resumes at once.

    Raises:
        PipelineError: another process holds it; the message names that process, and
            ends with `remedy`.
    """
    import fcntl

    handle = open(directory / ".lock", "a+")  # held open: closing it lets go
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise PipelineError(f"checkpoints {directory} are in use by {holder}: a run trains in one process at a "
                            f"time. {remedy}") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    handle.flush()
    return handle
