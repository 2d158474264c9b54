"""``python -m actorpool``: the same as the ``actorpool`` command."""

import sys

from actorpool.cli import main

sys.exit(main())
