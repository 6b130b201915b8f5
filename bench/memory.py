"""Peak RSS of a relay process while it publishes many events: it must stay flat."""

import subprocess
import sys
import time
import uuid

from bench.common import ROOT, prefill_outbox, truncate_outbox
from bench.stack import process_env
from bench.topic_count import TopicCounter


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def run(n: int, broker) -> dict:
    """Progress is counted off the topic (a topic of this run's own), not by a query on the database under test."""
    truncate_outbox()
    prefill_outbox(n)
    prefix = f"bench-rss-{uuid.uuid4().hex[:8]}."
    broker.create_topics(prefix + "order")
    counter = TopicCounter(broker.bootstrap, prefix + "order")
    relay = subprocess.Popen([sys.executable, "manage.py", "relay_outbox", "--until-empty"], cwd=ROOT,
                             env=process_env(OUTBOX_TOPIC_PREFIX=prefix), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    samples = []  # (events on the topic, rss KiB)
    started = time.perf_counter()
    try:
        while relay.poll() is None:
            samples.append((counter.count, rss_kib(relay.pid)))
            time.sleep(1.0)
    finally:
        counter.stop()
    elapsed = time.perf_counter() - started
    output = relay.stdout.read()
    if relay.returncode != 0:
        raise RuntimeError(output)
    # Not samples[0] when no sample fell in the first 10% (a quick run): that is the process still starting.
    sending = [(sent, rss) for sent, rss in samples if sent > 0] or samples
    early = [rss for sent, rss in sending if sent <= n * 0.1] or [sending[0][1]]
    late = [rss for sent, rss in sending if sent >= n * 0.9] or [sending[-1][1]]
    return {
        "events": n, "seconds": elapsed,
        "rss_mib_first_10pct": max(early) / 1024, "rss_mib_last_10pct": max(late) / 1024,
        "rss_mib_peak": max(rss for _, rss in samples) / 1024,
    }
