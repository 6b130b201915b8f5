"""`make bench`: every figure of DESIGN.md's targets from one run on this machine, side by side.

Writes docs/benchmarks.md, docs/benchmarks.json and docs/benchmarks.png.
"""

import argparse
import json
import platform
import os
import time

from bench import common  # noqa: F401  (configures the environment first)
from bench.common import ROOT, bench_user_token, setup_django, start_broker, truncate_outbox

TARGETS = {"drain_rate": 25_000, "drain_vs_sql": 0.7, "p50_ms": 25, "p99_ms": 100, "outbox_cost": 0.15,
           "deployed_vs_sql": 0.8, "deployed_vs_two_sql": 1.0, "consumer_vs_relay": 1.0, "consumer_vs_sql": 0.7, "projection_p50_ms": 50, "projection_p99_ms": 150}


def flush_redis() -> None:
    import redis
    from django.conf import settings

    redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()


def run_http(args, broker) -> dict:
    from bench.http_load import steady_rate, wrk_throughput
    from bench.stack import Stack

    token = bench_user_token()
    results = {}
    for mode, wake in (("wake_on_commit", 1), ("polling_only", 0)):
        truncate_outbox()
        flush_redis()
        stack = Stack(port=18001, OUTBOX_WAKE_ON_COMMIT=wake)
        try:
            results[mode] = steady_rate(port=18001, token=token, rate=args.rate, seconds=args.latency_seconds,
                                        bootstrap=broker.bootstrap, topic="outbox.event.order")
        finally:
            stack.stop()
        print(f"  latency {mode}: {fmt_latency(results[mode])}", flush=True)

    # The outbox write alone (no relay process: events accumulate), then the whole pipeline with the relay
    # publishing on the same two cores, each against the same app without the outbox write.
    for name, wsgi, relay in (("without_outbox", "bench.wsgi_without_outbox", False),
                              ("outbox_write_only", "project.wsgi", False),
                              ("with_outbox", "project.wsgi", True)):
        truncate_outbox()
        flush_redis()
        stack = Stack(port=18001, wsgi=wsgi, relay=relay)
        try:
            results[f"throughput_{name}"] = wrk_throughput(port=18001, token=token, seconds=args.throughput_seconds)
        finally:
            stack.stop()
        print(f"  throughput {name}: {results[f'throughput_{name}']:.0f} orders/s", flush=True)
    baseline = results["throughput_without_outbox"]
    results["outbox_cost"] = 1 - results["throughput_outbox_write_only"] / baseline
    results["pipeline_cost"] = 1 - results["throughput_with_outbox"] / baseline
    return results


def run_consumer(args, broker, skip: set) -> dict:
    from bench import consume

    results = {}
    print("  consumer apply rate...", flush=True)
    results["apply"] = consume.apply_rate(args.consumer_events or args.events, broker, token=bench_user_token())
    if "http" not in skip:
        print("  commit-to-projection latency...", flush=True)
        truncate_outbox()
        flush_redis()
        results["latency"] = consume.latency(port=18001, token=bench_user_token(), rate=args.rate,
                                             seconds=args.latency_seconds, broker=broker)
    print("  consumer memory...", flush=True)
    results["memory"] = consume.rss(args.consumer_rss_events, broker)
    return results


def fmt_latency(r: dict) -> str:
    return (f"p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.0f} ms "
            f"({r['received']}/{r['orders']} received at {r['achieved_rate']:.0f}/s, {r['missing']} missing, counted "
            f"as never arriving; {r['errors']} errors)")


def verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


def report(results: dict) -> str:
    d, h, m, c = results["drain"], results.get("http"), results.get("memory"), results.get("consumer")
    best_batch = max(d["relay_rate_by_batch"], key=d["relay_rate_by_batch"].get)
    default_rate = d["relay_rate_by_batch"][d["default_batch"]]
    lines = [
        "# Benchmarks\n",
        f"Made by `make bench` on {results['when']} ({results['machine']}), MariaDB, Redis and the Tansu broker",
        "on the same machine. Figures from one run; ratios are measured side by side in that run.\n",
        "## Relay drain (pre-filled outbox, acks=all, idempotent producer)\n",
    ]
    dep = results.get("deployed")
    if dep:
        from bench.deployed import report_lines as deployed_lines

        vs_one, vs_two = dep["median_vs_one"], dep["median_vs_two"]
        lines += [
            f"As deployed, like for like: {dep['events']:,} events written through the API (orders with items, 40% "
            f"cancelled), kept, and copied into a freshly truncated outbox before each side; in each round, in an "
            f"order that turns: raw SQL claim-and-mark in one process, in two processes, and the drain by "
            f"`celery -A project worker --concurrency {dep['worker_concurrency']}` with beat (started and warmed "
            f"before the backlog's commit, which wakes them; timed to the backlog's last message on the topic).\n",
            f"- **deployed / one raw-SQL connection: {vs_one:.2f}** (median of {len(dep['rounds'])} rounds; target "
            f"≥ {TARGETS['deployed_vs_sql']}: {verdict(vs_one >= TARGETS['deployed_vs_sql'])}); "
            f"/ two: {vs_two:.2f} (moonshot ≥ {TARGETS['deployed_vs_two_sql']}: "
            f"{verdict(vs_two >= TARGETS['deployed_vs_two_sql'])}); median rates: one connection "
            f"{dep['median_raw_sql_1_rate']:,.0f} rows/s, two {dep['median_raw_sql_2_rate']:,.0f}, deployed "
            f"{dep['median_deployed_rate']:,.0f} events/s",
            *deployed_lines(dep),
            "\nIn one process (`relay_run` called in a loop by the benchmark itself, no Celery; not what users run), "
            "each measurement on the same backlog freshly copied:\n",
        ]
    lines += [
        f"- {d['events']:,} events; claim query plan: `{d['explain']}`",
        f"- raw SQL claim-and-mark (no Kafka), batch 1000: **{d['raw_sql_rate']:,.0f} rows/s** (the mean of one "
        f"run before the relay's and one after: " + ", ".join(f"{r:,.0f}" for r in d["raw_sql_rates"]) + ")",
        f"- raw producer, same messages, no database: **{d['raw_producer_rate']:,.0f} msgs/s**",
        f"- relay, batch {d['default_batch']} (default), {d['lanes']} lanes: **{default_rate:,.0f} events/s** = "
        f"{default_rate / d['raw_sql_rate']:.2f} of raw SQL "
        f"(target ≥ {TARGETS['drain_rate']:,} events/s: {verdict(default_rate >= TARGETS['drain_rate'])}; "
        f"≥ {TARGETS['drain_vs_sql']} of raw SQL: {verdict(default_rate / d['raw_sql_rate'] >= TARGETS['drain_vs_sql'])})",
        "- relay by batch size: " + ", ".join(f"{b}: {r:,.0f}/s" for b, r in d["relay_rate_by_batch"].items())
        + f" (best: {best_batch})",
        f"- one claim while all {d['events']:,} rows are in backoff (a broker outage; each poll pays it): "
        f"**{d['claim_over_backoff_ms']:.0f} ms**",
    ]
    if h:
        wake, poll = h["wake_on_commit"], h["polling_only"]
        lines += [
            "\n## Commit-to-topic latency at a steady rate over HTTP (a reader of the topic, no consumer)\n",
            f"- with the on-commit wake-up: {fmt_latency(wake)} "
            f"(p50 < {TARGETS['p50_ms']} ms: {verdict(wake['p50_ms'] < TARGETS['p50_ms'])}; "
            f"p99 < {TARGETS['p99_ms']} ms: {verdict(wake['p99_ms'] < TARGETS['p99_ms'])})",
            f"- polling alone (beat every OUTBOX_POLL_INTERVAL): {fmt_latency(poll)}",
            "\n## Order creation throughput over HTTP (gunicorn, 4 workers; wrk, 16 connections)\n",
            f"- without the outbox write (baseline): **{h['throughput_without_outbox']:,.0f} orders/s**",
            f"- with the outbox write (event row + wake-up; no relay process running): "
            f"**{h['throughput_outbox_write_only']:,.0f} orders/s**: the outbox write costs **{h['outbox_cost']:.1%}** "
            f"of throughput (target ≤ {TARGETS['outbox_cost']:.0%}: {verdict(h['outbox_cost'] <= TARGETS['outbox_cost'])})",
            f"- with the outbox write and the relay publishing every event on the same two cores (Celery worker "
            f"+ beat, MariaDB and the broker share them with the web): **{h['throughput_with_outbox']:,.0f} orders/s**, "
            f"**{h['pipeline_cost']:.1%}** below the baseline",
        ]
    if results.get("tracing"):
        from bench.tracing_cost import report_lines

        lines += report_lines(results["tracing"])
    if m:
        lines += ["\n## Relay memory while publishing\n", rss_line(m, "relay_outbox")]
    if c:
        lines += consumer_report(c)
    lines.append("\n![latency percentiles and drain throughput](benchmarks.png)\n")
    return "\n".join(lines)


def rss_line(m: dict, process: str) -> str:
    line = (f"- {m['events']:,} events in {m['seconds']:.0f} s by one `{process}` process: RSS "
            f"{m['rss_mib_first_10pct']:.1f} MiB in the first 10%, {m['rss_mib_last_10pct']:.1f} MiB in the last 10%, "
            f"peak {m['rss_mib_peak']:.1f} MiB")
    if "rss_mib_second_half_peak" in m:  # the consumer's: see bench.consume.rss
        growth = m["rss_mib_second_half_peak"] - m["rss_mib_first_half_peak"]
        return (f"{line}; highest in the first half {m['rss_mib_first_half_peak']:.1f} MiB, in the second "
                f"{m['rss_mib_second_half_peak']:.1f} MiB (growth {growth:+.1f} MiB: {'flat' if growth < 10 else 'GROWS'})")
    growth = m["rss_mib_last_10pct"] - m["rss_mib_first_10pct"]
    return f"{line} (growth {growth:+.1f} MiB: {'flat' if growth < 10 else 'GROWS'})"


def consumer_report(c: dict) -> list[str]:
    a = c["apply"]

    def apply_line(name: str, processes: int) -> str:
        run, ceiling = a[f"consumer_{processes}"], a[f"raw_sql_{processes}"]["rate"]
        # Judged from the first applied event: start-up and the first group join (the coordinator's initial
        # rebalance delay) are paid once per process start, not per backlog.
        steady = run["rate_after_first"]
        vs_relay, vs_sql = steady / a["relay_rate"], steady / ceiling
        return (f"- {name}: **{steady:,.0f} events/s** from the first applied event = {vs_relay:.2f} of the relay's "
                f"drain (target ≥ {TARGETS['consumer_vs_relay']}: {verdict(vs_relay >= TARGETS['consumer_vs_relay'])}) "
                f"and {vs_sql:.2f} of the raw-SQL ceiling in as many processes ({ceiling:,.0f} rows/s; target ≥ "
                f"{TARGETS['consumer_vs_sql']}: {verdict(vs_sql >= TARGETS['consumer_vs_sql'])}); {run['rate']:,.0f} "
                f"events/s from process start, of whose {run['seconds']:.1f} s {run['first_applied_s']:.1f} s went by "
                f"before the first event was applied (start-up and the group join)")

    lines = [
        "\n## Consumer apply rate (`consume_events` as deployed, batches of up to 500), all in one step\n",
        f"- {a['events']:,} events written through the API, drained to a topic of their own by the relay as "
        f"deployed in this step: **{a['relay_rate']:,.0f} events/s**; the raw-SQL ceiling writes the same rows "
        f"(per 500: multi-row INSERT of the ids, stats upsert, COMMIT) in one process and in two (each its share "
        f"of the partitions): **{a['raw_sql_1']['rate']:,.0f}** and **{a['raw_sql_2']['rate']:,.0f} rows/s**",
        apply_line("one `consume_events` process", 1),
        apply_line("two `consume_events` processes in one group", 2),
    ]
    lat = c.get("latency")
    if lat:
        lines += [
            "\n## Commit-to-projection latency at a steady rate over HTTP\n",
            f"- from the 201 until `GET /api/customers/<id>/stats/` counts the order (one customer per order; "
            f"1 in {lat['track_every']} orders tracked, {lat['gets_per_s']:,.0f} GETs/s polling "
            f"through a gunicorn of their own): p50 {lat['p50_ms']:.1f} ms, p95 {lat['p95_ms']:.1f} ms, "
            f"p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.0f} ms ({lat['seen']}/{lat['tracked']} tracked orders "
            f"seen, {lat['orders']} posted at {lat['achieved_rate']:.0f}/s, {lat['errors']} errors) "
            f"(p50 < {TARGETS['projection_p50_ms']} ms: {verdict(lat['p50_ms'] < TARGETS['projection_p50_ms'])}; "
            f"p99 < {TARGETS['projection_p99_ms']} ms: {verdict(lat['p99_ms'] < TARGETS['projection_p99_ms'])})",
        ]
    lines += ["\n## Consumer memory while applying\n", rss_line(c["memory"], "consume_events")]
    if "memory_measured" in c:  # this section alone measured again, by bench.consume.rss
        lines[-1] += f" (measured again on its own at {c['memory_measured']})"
    return lines


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    consumer = results.get("consumer")
    figure, panels = plt.subplots(1, 3 if consumer else 2, figsize=(16 if consumer else 11, 4))
    left, right = panels[0], panels[1]
    drain = results["drain"]["relay_rate_by_batch"]
    right.plot(list(drain), list(drain.values()), marker="o", label="relay")
    right.axhline(results["drain"]["raw_sql_rate"], color="grey", linestyle="--", label="raw SQL claim+mark")
    right.axhline(TARGETS["drain_rate"], color="red", linestyle=":", label="target")
    right.set(xlabel="batch size", ylabel="events/s", title="Drain throughput by batch size", xscale="log")
    right.legend()
    http = results.get("http")
    if http:
        names = ["p50_ms", "p95_ms", "p99_ms"]
        xs = range(len(names))
        left.bar([x - 0.2 for x in xs], [http["wake_on_commit"][n] for n in names], width=0.4, label="on-commit wake-up")
        left.bar([x + 0.2 for x in xs], [http["polling_only"][n] for n in names], width=0.4, label="polling only")
        left.set_xticks(list(xs), ["p50", "p95", "p99"])
        left.set(ylabel="ms (log)", yscale="log", title="Commit-to-topic latency")
        left.legend()
    if consumer:
        a = consumer["apply"]
        bars = {"relay drain": a["relay_rate"], "consumer, 1 process": a["consumer_1"]["rate_after_first"],
                "consumer, 2 processes": a["consumer_2"]["rate_after_first"],
                "raw SQL, 1 process": a["raw_sql_1"]["rate"], "raw SQL, 2 processes": a["raw_sql_2"]["rate"]}
        panels[2].bar(list(bars), list(bars.values()), color=["tab:blue", "tab:orange", "tab:orange", "grey", "grey"])
        panels[2].set(ylabel="events/s", title=f"Same {a['events']:,} events: relay drain and consumer apply")
        panels[2].tick_params(axis="x", labelrotation=15)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=40_000,
                        help="the backlog of the drain and consumer runs, written through the API (kept between runs)")
    parser.add_argument("--batch-sizes", default="250,500,1000,2000")
    parser.add_argument("--rate", type=int, default=200, help="orders/s for the latency runs")
    parser.add_argument("--latency-seconds", type=float, default=20)
    parser.add_argument("--throughput-seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the deployed drain against raw SQL")
    parser.add_argument("--rss-events", type=int, default=1_000_000)
    parser.add_argument("--tracing-events", type=int, default=20_000, help="backlog for the tracing-cost drains")
    parser.add_argument("--consumer-events", type=int, default=None,
                        help="backlog for the consumer apply runs (default: --events, the same backlog)")
    parser.add_argument("--consumer-rss-events", type=int, default=1_000_000, help="backlog for the consumer's RSS")
    parser.add_argument("--skip", default="",
                        help="comma-separated: http (also the consumer's latency), memory (the relay's RSS), "
                             "consumer (every consumer part), tracing (what tracing costs)")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    broker = start_broker()
    try:
        setup_django()
        from django.conf import settings

        from bench import deployed, drain, memory

        results = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"}
        print("drain...", flush=True)
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        results["drain"] = drain.run(args.events, batch_sizes, token=bench_user_token())
        results["drain"]["default_batch"] = 1000 if 1000 in batch_sizes else batch_sizes[0]
        results["drain"]["lanes"] = settings.OUTBOX_RELAY_LANES
        print("deployed drain...", flush=True)
        results["deployed"] = deployed.run(args.events, broker, token=bench_user_token(), rounds=args.rounds)
        if "http" not in skip:
            print("http...", flush=True)
            results["http"] = run_http(args, broker)
        if "tracing" not in skip:
            print("tracing...", flush=True)
            from bench import tracing_cost

            results["tracing"] = tracing_cost.run(args.tracing_events, token=bench_user_token(),
                                                  throughput_seconds=args.throughput_seconds)
        if "memory" not in skip:
            print("memory...", flush=True)
            results["memory"] = memory.run(args.rss_events, broker)
        if "consumer" not in skip:
            print("consumer...", flush=True)
            results["consumer"] = run_consumer(args, broker, skip)
        truncate_outbox()
    finally:
        broker.stop()

    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "benchmarks.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report(results)
    (docs / "benchmarks.md").write_text(text + "\n")
    plot(results, docs / "benchmarks.png")
    print(text)


if __name__ == "__main__":
    main()
