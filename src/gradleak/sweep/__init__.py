"""The one sweep runner: a plan of work items, the results store, executors (processes, Ray)."""
