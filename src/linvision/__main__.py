"""``python -m linvision`` — same as the ``linvision`` command."""
from .cli import main

raise SystemExit(main())
