"""Checkpoints and weight files: safe loading (safe_load), model folders (pretrained), the training
checkpoint manager, format conversion and export, and the import of original taming checkpoints.

Nothing is imported here, so `taming_dist.models` can import `checkpoint.pretrained` lazily without
a cycle.
"""
