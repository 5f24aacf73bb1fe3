"""python3 -m xdpflow: the same as the `xdpflow` command."""

import sys

from .cli import main

sys.exit(main())
