"""Models and tokenizers: Hugging Face Auto classes, local dirs or hub ids, scalar heads, BPE training, LoRA, and
the wrappers a stage trains or reads (actor, critic, reward scores)."""
