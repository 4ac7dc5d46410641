"""`python -m fastmnist ...`: the `fastmnist` command."""

import sys

from .cli import main

sys.exit(main())
