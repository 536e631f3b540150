"""Sharded training and evaluation: mesh and sharding rules, optimizer, steps, checkpoints, the run."""
