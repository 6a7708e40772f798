"""Run outputs: summary.json, metrics.jsonl, report.md and plots."""
