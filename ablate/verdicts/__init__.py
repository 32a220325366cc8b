"""Turning metrics into verdicts: threshold rules, expectations, results.json."""
