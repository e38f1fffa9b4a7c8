"""WSGI entry point for the benchmarks: `gunicorn bench.wsgi:app` (the app + /bench routes)."""

from bench.bench_app import make_app

app = make_app()
