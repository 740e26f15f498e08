"""``python -m verify`` is the same as the ``metaverify`` command."""

import sys

from verify.cli import main

sys.exit(main())
