"""Evaluation: reward-model reports, win rates under a judge (with KL to a reference), and (later)
reward-KL curves and the final report."""
