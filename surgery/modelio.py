"""`surgery.modelio` is `surgery.files.models` under the name users' code and the README use."""

import sys

from surgery.files import models

sys.modules[__name__] = models
