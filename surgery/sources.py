"""`surgery.sources` is `surgery.data.sources` under the name users' code and the README use."""

import sys

from surgery.data import sources

sys.modules[__name__] = sources
