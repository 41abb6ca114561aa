"""Reviewing an agent's changes: rules as data (``rules``), what they find (``scan``), and git as the
engine of the snapshot, the diff and the export (``gitstore``, the one adapter that runs git here)."""
