"""Bytes on disk <-> tensors. Knows no model."""
