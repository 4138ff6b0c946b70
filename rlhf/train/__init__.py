"""Training machinery the stages share: the accelerator, precision, optimisers and schedules, the LM loop,
sharding, the demonstrations reader and the training guard."""
