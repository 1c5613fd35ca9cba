"""Command-line tools: export, benchmark, evaluate (run as scripts or with python -m)."""
