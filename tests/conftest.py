import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests run from a checkout with or without `pip install -e .`.
sys.path.insert(0, os.path.join(ROOT, "plugin"))
