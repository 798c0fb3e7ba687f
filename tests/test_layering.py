"""Flower stays in fedleak.sim: everything else imports and works with flwr blocked."""

import subprocess
import sys
from pathlib import Path

import fedleak

BLOCK_FLWR = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "flwr" or name.startswith("flwr."):
            raise ImportError(f"{name} is blocked: only fedleak.sim may import Flower")
sys.meta_path.insert(0, Block())
"""


def test_everything_but_sim_imports_without_flower():
    root = Path(fedleak.__file__).parent
    modules = sorted(
        "fedleak." + ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for p in root.rglob("*.py")
        if "sim" not in p.relative_to(root).parts and p.name != "__main__.py"
    )
    code = (
        BLOCK_FLWR
        + "\nimport importlib\n"
        + "\n".join(f"importlib.import_module({m!r})" for m in modules)
    )
    code += "\nfrom fedleak import config, federation\nfrom fedleak.core import Batch, ServerView\n"
    code += (
        "import torch\nexp = config.load({'data': {'name': 'digits'}, 'model': {'name': 'mlp'}})\n"
    )
    code += "federation.local_update(exp, 0, 1, federation.initial_params(exp))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(modules) > 20
