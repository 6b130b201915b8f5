from django.apps import AppConfig


class StatsConfig(AppConfig):
    name = "stats"

    def ready(self):
        from . import handlers  # noqa: F401  registers the event handlers
