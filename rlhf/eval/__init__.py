"""Evaluation: reward-model reports, judges, the demo task's
metrics, and (later) reward-KL curves and the final report."""
