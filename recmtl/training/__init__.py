"""Training: model assembly, minibatches, the loop, evaluation, distributed runs, devices, balance log."""
