"""`python -m training.triplets --help`."""

import sys

from .cli import main

sys.exit(main())
