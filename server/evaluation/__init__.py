"""Central evaluation of global checkpoints on a held-out cohort."""
