"""Helpers shared by tests (tests/conftest.py holds only fixtures).

- ``cli``: ``imgworker`` as a child process: environment, start, reaping, its worker processes.
- ``driving``: an in-process supervisor stepped to a condition, with the run's state on failure.
- ``kills``: worker kills placed by progress, not by time.
- ``memory``: a supervisor on in-memory parts.
- ``results``: the far end counted: result lines per key, calls the algorithm service received.
- ``store``: images put into the bucket.
- ``tomldoc``: TOML shown to users (README blocks, the sample config) read against the config's defaults.
"""
