"""``python -m sslcore`` = the ``sslcore`` command."""
import sys

from .cli import main

sys.exit(main())
