"""Training: model assembly, minibatches, the loop, evaluation, distributed runs, devices, balance log."""

# OpenMP threads that sleep while they wait, set before torch starts its thread pool (recmtl/threads.py)
from recmtl.threads import set_wait_policy

set_wait_policy()
