from r1fleet.cli import main

raise SystemExit(main())
