"""Evaluation without model weights: motion and temporal-quality metrics of any videos (`video.py`), Fréchet
distances between sets of video features (`frechet.py`), and `moalign evaluate` over a folder (`folder.py`).

Definitions, sources and how to read each metric: docs/evaluation.md.
"""
