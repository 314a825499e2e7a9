"""``python -m fedmira ...``: the same as the ``fedmira`` console script."""

import sys

from fedmira.cli import main

sys.exit(main())
