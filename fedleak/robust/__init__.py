"""Group-robust training rules: how per-group losses and gradients become one update.

Phan, Wilson & Lei, "Controllable Prompt Tuning for Balancing Group Distributional
Robustness" (CPT), ICML 2024, and the baselines it is measured against: ERM, group
reweighting and GroupDRO (Sagawa, Koh, Hashimoto & Liang, ICLR 2020).

Every rule here maps the K group losses (and, for CPT, the K x K Gram matrix of the group
gradients of a small tunable block) to a vector of group weights on the simplex; the update
descends along ``sum_k w_k grad L_k``.  Plain numpy/torch functions, no plugin: the client
trainer (:mod:`fedleak.training.cpt`, groups inside a client) and the server strategy
(:mod:`fedleak.server.cpt`, groups = clients) both build on them.

What leaks: CPT needs, per step, each group's loss and the Gram matrix of the group gradients.
Whoever solves the program holds both; when groups are clients that is the server, and a
client's gradient of a linear head reveals its label mix (see the benchmark
``simulations/benchmarks/server_strategies/cpt_clients.py``).
"""
