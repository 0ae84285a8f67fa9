"""The step engine: config, optimizer and schedule, gradients, logging, evaluation, training loop."""
