"""``python -m memsched``: the same as the ``memsched`` command."""
import sys

from .cli import main

sys.exit(main())
