"""The pure core of stepvisor: values and decisions, with no threads and no I/O.

``model`` (workflows, steps, settings), ``graph`` (the DAG and its canonical
order), ``state`` (run state as persistent values), ``events`` and ``result``
(what a run tells and returns), and ``machine`` (every decision of a run).
Nothing here starts a thread, reads a clock or touches a file: the actor shell
in :mod:`stepvisor.actors` carries out what the machine decides.
"""
