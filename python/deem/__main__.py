"""`python -m deem`: the deem command line."""

import sys

from deem.cli import main

sys.exit(main())
