"""Who judges two answers to one prompt: the demo's gold utility, a reward model, a local causal LM, an
OpenAI-compatible endpoint, or people in the labeling app.

Every judge answers the same question through `Judge.compare_all`: for each (prompt, first, second), the
probability that the first answer is the better one (1.0, 0.5 and 0.0 for a judge that only says which).
An optional principle (a question such as "Which answer is more honest?", or one principle of a
constitution) steers the judges that read text; the gold utility and reward models ignore it.
Evaluation (`rlhf eval`) and AI-feedback labelling use the same judges.
"""
