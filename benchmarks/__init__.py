"""Benchmarks: speed and memory of rlhf-loop's stages, side by side with peers (`make bench`)."""
