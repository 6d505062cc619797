"""Checkpoint surgery and inspection: `fp4serve graft-mtp | strip-vision | rename-tensors | doctor`.

formats/safetensors_file.py (headers, raw tensor copies), checkpoint_dir.py (a directory's shards
and index, staged atomic rewrites) and quant_lists.py (ignore/exclude lists) are shared by every
command; one module per command on top of them (docs/toolkit.md)."""
