from mistralfs.cli import main

raise SystemExit(main())
