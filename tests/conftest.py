import zlib  # noqa: F401  (before paddle, see compress/__init__.py)
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import compress  # noqa: E402,F401
