"""The synthetic physics playground and the CPU demo built on it: a 2-D world with exact physics and optical
flow, its toy VideoPhy2 judge, the demo's small base model and encoder pretraining, and the demo report.

The method's modules never import this package; only the CLI and the demo do.
"""
