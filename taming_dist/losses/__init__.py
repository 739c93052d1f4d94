"""Losses: single-device PyTorch (no distributed imports)."""
