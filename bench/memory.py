"""Peak RSS of a relay process while it publishes many events: it must stay flat."""

import subprocess
import sys
import time

from bench.common import ROOT, prefill_outbox, truncate_outbox
from bench.stack import process_env


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def sent_count() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM outbox_outboxevent WHERE status = 'sent'")
        return cursor.fetchone()[0]


def run(n: int) -> dict:
    truncate_outbox()
    prefill_outbox(n)
    relay = subprocess.Popen([sys.executable, "manage.py", "relay_outbox", "--until-empty"], cwd=ROOT,
                             env=process_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples = []  # (events sent, rss KiB)
    started = time.perf_counter()
    while relay.poll() is None:
        samples.append((sent_count(), rss_kib(relay.pid)))
        time.sleep(1.0)
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
