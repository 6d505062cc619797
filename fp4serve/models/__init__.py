"""One file per model family; registry.py maps a config's `architectures` to a class."""
