"""The language model: loading models and embedders (bundled, Hugging Face, fakes), prompting,
generation and answer likelihoods. Imports nothing above the foundation (docs/architecture.md)."""
