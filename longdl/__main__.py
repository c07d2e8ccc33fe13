from __future__ import annotations

from longdl.cli import main

raise SystemExit(main())
