from lipverify.cli import main

raise SystemExit(main())
