"""Training stages, one per file, each a loop you can read top to bottom."""
