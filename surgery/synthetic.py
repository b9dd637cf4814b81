"""`surgery.synthetic` is `surgery.testing.synthetic` under the name users' code and the README use."""

import sys

from surgery.testing import synthetic

sys.modules[__name__] = synthetic
