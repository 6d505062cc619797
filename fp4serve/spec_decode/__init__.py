"""Speculative decoding: proposers (n-gram, MTP, DFlash), lossless verification, acceptance metrics."""
