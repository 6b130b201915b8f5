"""What tracing costs: the relay's drain (`relay_outbox --until-empty`, a process of its own) and order creation
over HTTP (gunicorn, wrk), with tracing off, with the console exporter, and with the OTLP exporter sending to a
local OTLP/HTTP endpoint (a stand-in collector in this process that accepts every export)."""

import http.server
import subprocess
import sys
import threading

from bench.common import ROOT, Timer, prefill_outbox, truncate_outbox
from bench.stack import Stack, process_env

MODES = {
    "off": {"OTEL_TRACES_EXPORTER": "none"},
    "console": {"OTEL_TRACES_EXPORTER": "console"},
    "otlp": {"OTEL_TRACES_EXPORTER": "otlp"},  # + the endpoint, set when the sink listens
}
LOG = ROOT / ".run" / "bench-tracing.log"


class _Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (the handler's API)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.exports += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def otlp_sink() -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    server.exports = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def drain_seconds(n: int, env: dict) -> float:
    truncate_outbox()
    prefill_outbox(n, traced=True)  # each producer span a child of the request's, as README "Tracing" describes
    with open(LOG, "ab") as log, Timer() as t:
        done = subprocess.run([sys.executable, "manage.py", "relay_outbox", "--until-empty"], cwd=ROOT,
                              env=process_env(**env), stdout=log, stderr=subprocess.PIPE, timeout=120 + n / 200)
    if done.returncode != 0:
        raise RuntimeError(f"relay_outbox exited {done.returncode}: {done.stderr[-2000:]}")
    return t.seconds


def run(n: int, *, token: str, throughput_seconds: int, port: int = 18001) -> dict:
    from bench.http_load import wrk_throughput

    sink = otlp_sink()
    modes = {name: dict(env) for name, env in MODES.items()}
    modes["otlp"]["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink.server_address[1]}"
    results = {"events": n}
    try:
        for name, env in modes.items():
            results[f"drain_{name}"] = n / drain_seconds(n, env)
            truncate_outbox()
            stack = Stack(port=port, relay=False, **env)  # the web alone: the outbox write, no relay
            try:
                results[f"http_{name}"] = wrk_throughput(port=port, token=token, seconds=throughput_seconds)
            finally:
                stack.stop()
            print(f"  tracing {name}: drain {results[f'drain_{name}']:,.0f} events/s, "
                  f"HTTP {results[f'http_{name}']:,.0f} orders/s", flush=True)
        results["otlp_exports_received"] = sink.exports
    finally:
        sink.shutdown()
        truncate_outbox()
    return results


def report_lines(t: dict) -> list[str]:
    def versus(key: str) -> str:
        return f"{t[key] / t[key.rsplit('_', 1)[0] + '_off'] - 1:+.1%}"

    return [
        "\n## What tracing costs (README \"Tracing\")\n",
        f"- relay drain of {t['events']:,} events (`relay_outbox --until-empty`): off **{t['drain_off']:,.0f} "
        f"events/s**; console exporter {t['drain_console']:,.0f} ({versus('drain_console')}); OTLP exporter "
        f"{t['drain_otlp']:,.0f} ({versus('drain_otlp')})",
        f"- order creation over HTTP (web alone, wrk): off **{t['http_off']:,.0f} orders/s**; console "
        f"{t['http_console']:,.0f} ({versus('http_console')}); OTLP {t['http_otlp']:,.0f} ({versus('http_otlp')}); "
        f"{t['otlp_exports_received']} OTLP exports received by the stand-in collector",
    ]
