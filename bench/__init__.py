"""`make bench`, beside the runtime packages: `python -m bench` (bench/__main__.py says what it measures).

harness.py runs and measures the children (tasks.py), peers.py installs and runs the peer
exporters, models.py synthesizes and caches the checkpoints, suites/ holds one module per suite,
report.py renders the table and bench.json. Imports export/, engines/ and runner/; none of them
imports bench.
"""
