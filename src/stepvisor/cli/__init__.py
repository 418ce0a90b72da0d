"""The command-line front end: ``stepvisor run|resume|status|cancel|report|config``.

``main`` parses and dispatches; ``_progress`` draws the live display and
``_report`` writes the HTML report.  Nothing in the engine imports this package.
"""
