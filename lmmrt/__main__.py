from lmmrt.cli import main

raise SystemExit(main())
