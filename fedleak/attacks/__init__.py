"""Attacks: what a curious or malicious server reconstructs from a client's update.

One file per attack, registered in :data:`ATTACKS` under the file's name.
"""

from fedleak.registry import Registry, autoload

ATTACKS = Registry("attack")
autoload(__name__)
