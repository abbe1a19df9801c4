"""Pure tensor functions: the sampling policy, log-probs, entropies."""
