"""`python -m osteoscreen.cli`."""
import sys

from . import main

sys.exit(main())
