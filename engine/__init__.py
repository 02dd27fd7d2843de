"""Plumbing shared by every entry script: flags, run set-up, precision, the training loop, checkpoints."""
