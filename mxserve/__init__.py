"""mxserve: mixed-precision MoE serving (MxMoE, online)."""

import time

__version__ = "0.1.0"
STARTED = time.monotonic()  # when this process began to import mxserve: `mxserve launch` says when SGLang started
