"""``python -m discl_ray.cli <command> …``: the ``discl`` console script without its launcher."""

import sys

from discl_ray.cli import main

sys.exit(main())
