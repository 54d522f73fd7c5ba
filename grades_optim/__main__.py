"""``python -m grades_optim``: the same as the ``grades-optim`` console script."""
import sys

from grades_optim.cli import main

sys.exit(main())
