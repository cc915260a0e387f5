"""The learner: the LoRA side path and its persistence, the target table, the adaptation core
(normalise, combine, step), document gradients and tensor energy. Knows models, not workspaces."""
