"""pipeline.heavy_imports: TensorFlow's import runs no garbage collection and leaves its
objects frozen out of later ones; a block whose modules are imported already changes nothing."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading

from pipeline.heavy_imports import first_import

# In a fresh interpreter: collections during the import, and objects frozen after it.
IMPORT_TENSORFLOW = """
import gc, json
full = []
gc.callbacks.append(lambda phase, info: full.append(1) if phase == "stop" and info["generation"] == 2 else None)
from pipeline import quiet
before = len(full)
quiet.import_tensorflow()
print(json.dumps({"during": len(full) - before, "frozen": gc.get_freeze_count(), "enabled": gc.isenabled()}))
"""


def test_tensorflow_imports_without_full_collections_and_stays_out_of_later_ones() -> None:
    import json

    done = subprocess.run([sys.executable, "-c", IMPORT_TENSORFLOW], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["during"] == 0, report  # 7 full collections without the pause (2026-12-02)
    assert report["frozen"] > 200_000, report  # TensorFlow and Keras: ~500k objects
    assert report["enabled"], report


def test_a_block_of_modules_imported_already_neither_pauses_nor_freezes() -> None:
    frozen = gc.get_freeze_count()
    with first_import("gc", "sys"):
        assert gc.isenabled()
        garbage = [[]]
        garbage[0].append(garbage)  # a cycle made in the block stays collectable
    assert gc.get_freeze_count() == frozen
    del garbage


def test_overlapping_blocks_on_two_threads_resume_collection_once_both_end() -> None:
    inside, release = threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def other_import() -> None:
        with first_import("a_module_nobody_imported"):
            inside.set()
            release.wait(10)
            seen["other, after the first block ended"] = gc.isenabled()

    assert gc.isenabled()
    thread = threading.Thread(target=other_import)
    with first_import("another_module_nobody_imported"):
        thread.start()
        assert inside.wait(10)
        assert not gc.isenabled()
    seen["first, its block ended, the other's not"] = gc.isenabled()
    release.set()
    thread.join(10)
    assert seen == {"first, its block ended, the other's not": False, "other, after the first block ended": False}
    assert gc.isenabled(), "collection resumes once the last block ends"
