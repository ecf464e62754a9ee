"""Benchmarks: ``discl bench NAME`` runs ``discl_ray.bench.NAME:main(argv)``; each prints a table and
can write JSON with ``--json PATH``."""
