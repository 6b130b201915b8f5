from django.apps import AppConfig


class RelayConfig(AppConfig):
    name = "relay"

    def ready(self):
        from celery.signals import worker_process_init, worker_process_shutdown

        from outbox.hooks import register_after_commit

        from .kafka import producer, producer_warm_up
        from .services import relay_wake

        register_after_commit(relay_wake)  # a commit that wrote events wakes the relay

        @worker_process_init.connect(weak=False)
        def warm_up_producer(**kwargs):
            # Connect, get the idempotent producer id and the topic's metadata now, in the background,
            # rather than in the first relay run after a (re)start (about half a second).
            producer_warm_up()

        @worker_process_shutdown.connect(weak=False)
        def flush_producer(**kwargs):
            producer.flush(5.0)
