"""The collector settings of the processes that move events in batches (relay workers, relay_outbox, consumer)."""

import json
import pathlib
import subprocess
import sys

from ops.runtime import YOUNG_COLLECTION_THRESHOLD

ROOT = pathlib.Path(__file__).resolve().parent.parent

# In a process of its own: the settings are process-wide, and the test process keeps Python's defaults.
PROBE = """
import gc, json
from ops.runtime import collect_garbage_for_batches

start_up = [[i] for i in range(1000)]  # what start-up loaded
collect_garbage_for_batches()
frozen = gc.get_freeze_count()
before = sum(s["collections"] for s in gc.get_stats())
batch = [(str(i), [i]) for i in range(20_000)]  # a relay batch's worth of live containers, then freed
del batch
during = sum(s["collections"] for s in gc.get_stats()) - before
print(json.dumps({"threshold": gc.get_threshold(), "frozen": frozen, "collections_during_batch": during}))
"""


def test_start_up_objects_are_frozen_and_a_batch_runs_no_collection():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    probe = json.loads(out)
    assert probe["threshold"][0] == YOUNG_COLLECTION_THRESHOLD
    assert probe["frozen"] >= 2000  # at least the start-up list and its items
    # 40,000 containers allocated and freed by reference counting: the collector did not walk them (Python's
    # default threshold of 700 runs it dozens of times for this).
    assert probe["collections_during_batch"] == 0


def test_pythons_default_would_have_collected_during_that_batch():
    """The probe above can fail: without the call, the same batch runs the collector."""
    out = subprocess.run([sys.executable, "-c", PROBE.replace("collect_garbage_for_batches()\n", "")],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert json.loads(out)["collections_during_batch"] > 10
