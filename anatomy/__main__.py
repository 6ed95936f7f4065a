"""python -m anatomy ADAPTER: what an adapter learned (anatomy/__init__.py)."""
import sys

from anatomy import main

sys.exit(main())
