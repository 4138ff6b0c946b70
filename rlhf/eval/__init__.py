"""Evaluation: win rates under a judge, KL to a reference, the demo task's metrics, reward-model reports."""
