"""``python -m otface.demo OUT_DIR [--seed N]``: write the demo data set into a folder."""

import sys

from otface.demo.generate import main

if __name__ == "__main__":
    sys.exit(main())
