"""sdconv's test suite. A package so that its helpers import as ``tests.helpers``
(pytest puts the repository root on sys.path: ``pythonpath`` in pyproject.toml)."""
