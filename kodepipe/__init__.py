"""kodepipe: disposable, isolated sandboxes for AI coding agents, as Unix commands."""

__version__ = "0.1.0"
