"""The run machinery every algorithm shares: the training loop, its run folder and resume, the optimizer plumbing, metrics, memory, config overrides, reward choice."""
