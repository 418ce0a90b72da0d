"""How a Worker runs one attempt: on its thread, an event loop, a child process, or Ray."""
