"""Optimisation algorithms that are not plugins: plain functions with explicit generators.

:mod:`fedleak.optim.zeroth_order` holds the minimax-optimal two-stage zeroth-order algorithm
(Yu, Wang, Huang, Lei & Lee, NeurIPS 2024), its estimators and the two-point ZO-SGD baseline;
the server strategy ``zo_newton`` and the trainers in :mod:`fedleak.training.zeroth_order` run
them inside a federation.
"""
