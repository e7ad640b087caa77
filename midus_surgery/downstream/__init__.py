"""Downstream evaluation: lm-evaluation-harness tasks (harness.py) and an offline task suite (task_suite.py)."""
