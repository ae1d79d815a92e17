"""Other pruning tools, run the way pare runs its own pruning, for comparisons with equal treatment."""
