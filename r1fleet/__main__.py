from r1fleet.cli.main import main

raise SystemExit(main())
