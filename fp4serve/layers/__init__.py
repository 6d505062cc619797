"""Model building blocks. Each has a plain torch reference implementation: the numerical truth."""
