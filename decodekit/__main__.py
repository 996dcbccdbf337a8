from decodekit.cli import main

raise SystemExit(main())
