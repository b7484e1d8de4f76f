"""RankE-py: post-training for discrete autoregressive text-to-image models with decoder co-evolution."""

__version__ = "0.1.0"
