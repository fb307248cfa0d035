"""``python -m dac_fast`` runs the ``dac-fast`` command line."""

import sys

from .cli import main

sys.exit(main())
