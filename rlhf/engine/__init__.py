"""The execution layer: packed forwards, the lean Llama forward and its fused CPU kernels, KV-cache decoding,
sampling and best-of-n, shared by the stages, eval and serve."""
