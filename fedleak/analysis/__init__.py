"""Exact analyses of what federated strategies can learn and what their messages reveal.

Plain numerical functions (numpy and scipy, no federation runtime): the server strategies use
them, and their tests and benchmarks check them against closed forms and Monte Carlo.
"""
