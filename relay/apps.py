from django.apps import AppConfig


class RelayConfig(AppConfig):
    name = "relay"

    def ready(self):
        from celery.signals import worker_process_init, worker_process_shutdown

        from .kafka import producer, producer_warm_up

        @worker_process_init.connect(weak=False)
        def warm_up_producer(**kwargs):
            # Connect, get the idempotent producer id and the topic's metadata now, in the background,
            # rather than in the first relay run after a (re)start (about half a second).
            producer_warm_up()

        @worker_process_shutdown.connect(weak=False)
        def flush_producer(**kwargs):
            producer.flush(5.0)
