"""``python -m aiva_monai.experiments``: the experiment matrix's command line (``aiva_monai.experiments.cli``)."""

import sys

from aiva_monai.experiments.cli import main

sys.exit(main())
