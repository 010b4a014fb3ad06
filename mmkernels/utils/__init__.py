"""Helpers shared by the data builders, the models and the trainer (no imports of theirs)."""
