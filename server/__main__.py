"""`python -m recallfix.server ...` = `recallfix serve ...` (vLLM spawns processes: the guard matters)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
