"""Evaluation: reward-model reports, and (later) win rates under a judge, reward-KL curves, the final report."""
