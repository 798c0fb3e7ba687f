"""Server-side model modifiers: what a server changes in the global model before sending it.

Adversarial ones (imprint blocks, widened poolers) belong to a malicious server's threat model;
benign ones (pruning the global model) are part of the training protocol.
"""

from fedleak.registry import Registry, autoload

MODIFIERS = Registry("modifier")
autoload(__name__)
