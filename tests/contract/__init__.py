"""The backend contract suite: one set of behaviour tests, run on every backend.

Each test takes the ``backend`` fixture (see ``conftest.py``) and so runs once
per executor: thread, async, process and Ray.  What a backend cannot do is
stated in the capability tables in ``conftest.py``, and the tests assert what
that backend does instead; nothing is skipped silently.
"""
