"""The thin actor shell: a Supervisor and its Workers, moving immutable messages."""
