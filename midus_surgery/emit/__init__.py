"""Executes a plan: the emitter, its companion files, and verify."""
