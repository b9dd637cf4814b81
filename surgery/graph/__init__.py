"""The graph: spot resolution, taps, the rewrite engine and its edits, BN sites,
tracing and fusion rules.
"""
