from django.apps import AppConfig


class TestHandlersConfig(AppConfig):
    """Event handlers that exist only in the test settings, to make consumer failures happen."""

    name = "tests.testhandlers"
    label = "testhandlers"

    def ready(self):
        from . import handlers  # noqa: F401
