"""runstate: event-sourced task-run state orchestration with Prefect 3 semantics."""

__version__ = "0.1.0"
