"""``python -m linvision.bench ARGS`` = ``linvision bench ARGS``."""
import sys

from ..cli import main

raise SystemExit(main(["bench", *sys.argv[1:]]))
