"""``python -m fedleak`` is the ``fedleak`` command."""

import sys

from fedleak.cli import main

sys.exit(main())
