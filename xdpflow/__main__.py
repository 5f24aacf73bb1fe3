"""python3 -m xdpflow: the same as the `xdpflow` command."""

import sys

from xdpflow.app.cli import main

if __name__ == "__main__":  # importing the module alone runs nothing
    sys.exit(main())
