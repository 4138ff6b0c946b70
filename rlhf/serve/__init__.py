"""OpenAI-compatible serving of a policy, with continuous batching and A/B feedback capture (`rlhf serve`)."""
