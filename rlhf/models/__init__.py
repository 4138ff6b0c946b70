"""Models and tokenizers: Hugging Face Auto classes, local dirs or hub ids, scalar heads, BPE training."""
