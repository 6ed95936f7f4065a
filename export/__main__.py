"""python -m export: the command of export/cli.py."""
import sys

from export.cli import main

sys.exit(main())
