"""Scheduling, caches, model running, sampling: the step loop behind LLM and the server."""
