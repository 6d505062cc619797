"""`fp4serve bench`: measure any OpenAI-compatible endpoint over HTTP (serve, compare) or the engine
in-process (offline). Only `offline` imports the engine; everything else speaks HTTP."""
