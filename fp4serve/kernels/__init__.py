"""Device fast paths. Each must match its layers/ reference (tests/unit compare them)."""
