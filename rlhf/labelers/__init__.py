"""Judges that stand in for people: the demo task's gold utility and the simulated labeler panel."""
