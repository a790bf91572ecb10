"""Helpers and worker scripts of the test suite (one package, so that no module of ours shadows an installed one).

Worker scripts run as modules from ``tests/``: ``cd tests && torchrun --nproc_per_node=2 -m simigrad_testkit.dist_worker``.
"""
