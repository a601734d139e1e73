"""runstate: event-sourced task-run state orchestration with Prefect 3 semantics.

`pip install runstate` is the client for workers and subscribers (runstate.client, with
runstate.messages and runstate.domain); the service, gateway and CLI need the server extra.
"""

# The one place the version is written: pyproject.toml reads it (dynamic), `runstate --version` prints it.
__version__ = "0.1.0"
