"""Turning logits into tokens: plain sampling (sampler.py) and lossless verification of drafts (verify.py)."""
