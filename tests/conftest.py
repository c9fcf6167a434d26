"""Tests run torch with one intra-op thread: on a small shared machine, spinning
worker threads cost more than they give. Tests that exercise threading set it
themselves (see the thread-count determinism tests)."""
import torch

torch.set_num_threads(1)
