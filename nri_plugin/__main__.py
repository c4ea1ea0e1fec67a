"""`python -m nri_plugin` is `nri-qos`."""

import sys

from nri_plugin.cli import main

sys.exit(main())
