"""``python -m positnn``: the ``positnn`` command (what torchrun runs with ``-m positnn``)."""

import sys

from .cli import main

sys.exit(main())
