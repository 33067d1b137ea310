"""Data plumbing: manifests, clip sampling and geometry, video I/O, optical-flow estimators and the sharded
caches every stage trains from.
"""
