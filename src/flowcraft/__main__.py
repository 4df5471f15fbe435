"""``python -m flowcraft`` is the ``flowcraft`` command."""

import sys

from .cli import main

sys.exit(main())
