"""The offline half: ingesting documents, building a bank (local or Ray), removing documents."""
