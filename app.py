"""WSGI entry point: `gunicorn -c gunicorn.conf.py app:app`."""

from herald_smtp import create_app

app = create_app()
