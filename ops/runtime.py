"""Process-wide settings for the processes that move events in batches (the relay's workers, the consumer)."""

import gc

# Allocations not yet freed that trigger a young collection (Python's default: 700). A relay batch holds some
# tens of thousands of small containers until it ends, and frees them by reference counting: at 700 the collector
# ran some 2,000 times per 100,000 events, walking each batch's live objects again and again (measured: 10.7
# us/event of a drain's 40-50 without gc.freeze(), 2.7 with it; none at this threshold, which the
# batches' own objects never reach).
YOUNG_COLLECTION_THRESHOLD = 50_000


def collect_garbage_for_batches() -> None:
    """Call once start-up is done: what it loaded lives as long as the process, so the collector stops walking
    it (gc.freeze), and young collections wait for garbage that reference counting leaves (cycles) to pile up."""
    gc.freeze()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])
