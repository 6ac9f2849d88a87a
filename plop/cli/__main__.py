"""``python -m plop.cli``: what ``accelerate launch -m plop.cli`` and ``torchrun -m plop.cli`` run."""

import sys

from . import main

sys.exit(main())
