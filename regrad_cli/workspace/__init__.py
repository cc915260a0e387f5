"""Workspace state: configuration (regrad.toml), the documents table, which learner checkpoint
and which bank are meant, and the loaded model + learner of a workspace."""
