"""Evaluation: generation, answer extraction, log-likelihood scoring, sandboxed code execution.
Entry point: `losia_cli.eval.runner.evaluate` (kept out of this module so importing the sandbox or
the extractors does not import torch)."""
