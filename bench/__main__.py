"""python -m bench: the benchmark of bench/bench.py."""
import sys

from bench.bench import main

sys.exit(main())
