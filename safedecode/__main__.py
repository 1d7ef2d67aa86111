"""``python -m safedecode``: the command line (:mod:`safedecode.cli`)."""
import sys

from .cli import main

sys.exit(main())
