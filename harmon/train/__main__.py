"""``python -m harmon.train CONFIG [--resume] [key=value ...]`` (the torchrun entry point)."""

import sys

from .cli import main

sys.exit(main())
