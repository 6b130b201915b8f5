"""WSGI config: `gunicorn project.wsgi`."""

import os

import django
from django.core.handlers.wsgi import WSGIHandler

from ops.tracing import tracing_setup

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

# get_wsgi_application() in two steps: the Django instrumentation (tracing on) adds its middleware after setup
# (it reads settings) and before the handler builds the middleware chain.
django.setup(set_prefix=False)
tracing_setup(process="web", django=True)
application = WSGIHandler()
