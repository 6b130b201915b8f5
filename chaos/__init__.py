"""End-to-end chaos run: the real processes, real faults, and a checker that proves what reached Kafka.

Run it with `python -m chaos.run [--seconds N] [--rate R] [--quick]` (see chaos/run.py).
"""
