"""Evaluation of any causal LM (ours, converted, plain transformers): perplexity, lm-eval tasks, passkey, the suite."""
