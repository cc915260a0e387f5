"""`regrad eval`: every system on the same questions, through the one answering pipeline.

    config.py     the systems (pipeline modes + which documents) and EvalConfig
    workspace.py  hard-retrieval corpus, content-keyed eval workspaces, gold document ids
    systems.py    requests per system -> QueryEngine.answer_many -> scored records
    drift.py      perplexity of the deployed weights, base sha256 / L2, phi identity
    harness.py    run_eval: datasets, stages (continual mode), metrics, paired comparisons
    report.py     report.md, plots, significance sentences, --fail-under, --baseline

Systems (method.md §1.5, §2; pipeline mode in brackets):

    closed-book       base model, no side path [closed-book]
    closed-book+phi   meta-learned phi, no gradients [closed-book+phi]
    rag               base model, top-k passages [context]
    rag+phi           phi, top-k passages, no gradients [rag+phi]: the fair RAG baseline
    cpt, cpt+rag      continual pre-training of a copy, without / with passages
    regrad            top-k gradients, no passages [param]
    regrad+context    top-k gradients + passages [param+context]
    oracle            the gold document's gradient only [param, docs = gold]: injection's upper bound
    shifted           question i gets question i+1's retrieved gradients [param]
    random            k random documents' gradients [param]
"""

from regrad_cli.learning.evaluation.config import (CPT_SYSTEMS, REFERENCES, REGRAD_SYSTEMS, SYSTEMS, EvalConfig,
                                          parse_fail_under, parse_systems)
from regrad_cli.learning.evaluation.harness import aggregate, run_eval, split_groups

__all__ = ["CPT_SYSTEMS", "REFERENCES", "REGRAD_SYSTEMS", "SYSTEMS", "EvalConfig", "aggregate", "parse_fail_under",
           "parse_systems", "run_eval", "split_groups"]
