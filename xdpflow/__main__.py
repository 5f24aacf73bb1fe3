"""python3 -m xdpflow: the same as the `xdpflow` command."""

import sys

from xdpflow.app.cli import main

sys.exit(main())
