"""Evaluation: reward-model reports, win rates under a judge (with KL to a reference), the demo task's
metrics, and (later) reward-KL curves and the final report."""
