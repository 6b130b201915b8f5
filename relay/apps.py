from django.apps import AppConfig


class RelayConfig(AppConfig):
    name = "relay"

    def ready(self):
        from celery.signals import worker_process_shutdown

        from .kafka import producer

        @worker_process_shutdown.connect(weak=False)
        def flush_producer(**kwargs):
            producer.flush(5.0)
