"""sslcore benchmarks: each op beside its anchors, one process per run (``python -m bench``).

Not installed with the package; run from the repository root.
"""
