"""stepvisor's benchmarks, measured beside what users would pick instead.

Run ``python -m benchmarks`` (``--quick`` for a short pass, ``--only NAME`` for
one scenario, ``--list`` to see them).  Each ``scenario_<name>.py`` module is
found automatically; :mod:`benchmarks.harness` describes the contract.
"""
