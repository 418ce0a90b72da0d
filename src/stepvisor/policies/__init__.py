"""Pure policy: retries, deadlines, dispatch priority and failure handling."""
