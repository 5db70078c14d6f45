from migpipe.cli import main

raise SystemExit(main())
