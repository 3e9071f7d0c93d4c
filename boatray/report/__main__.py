"""`python -m boatray.report RESULTS_DIR [--out DIR]`."""

from boatray.report import main

raise SystemExit(main())
