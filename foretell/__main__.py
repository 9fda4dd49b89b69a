"""``python -m foretell`` runs the ``foretell`` command."""

import sys

from foretell.cli import main

sys.exit(main())
