"""PRISM on PyTorch Lightning: persona routing via intent-based self-modeling."""

__version__ = "0.1.0"
