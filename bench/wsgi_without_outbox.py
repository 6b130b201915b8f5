"""The web app with the outbox write removed: the baseline for what the outbox costs per order.
For benchmarks only; never deploy this."""

from project.wsgi import application  # noqa: F401  (sets Django up first)

import orders.services  # noqa: E402

orders.services.outbox_enqueue = lambda **kwargs: None
