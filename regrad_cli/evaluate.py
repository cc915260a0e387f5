"""Compatibility name: the eval harness lives in the package regrad_cli.evaluation."""

from regrad_cli.evaluation import (CPT_SYSTEMS, REFERENCES, REGRAD_SYSTEMS, SYSTEMS, EvalConfig, aggregate,
                                   parse_fail_under, parse_systems, run_eval, split_groups)
from regrad_cli.evaluation.drift import l2_distance, perplexity
from regrad_cli.evaluation.report import draw_plots, render_report

__all__ = ["CPT_SYSTEMS", "REFERENCES", "REGRAD_SYSTEMS", "SYSTEMS", "EvalConfig", "aggregate", "draw_plots",
           "l2_distance", "parse_fail_under", "parse_systems", "perplexity", "render_report", "run_eval",
           "split_groups"]
