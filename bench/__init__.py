"""Benchmarks: gate overhead, races, scale, throughput and a soak, against gunicorn + PostgreSQL."""
