"""Data readers and writers (no torch here), preference formats and the demo task."""
