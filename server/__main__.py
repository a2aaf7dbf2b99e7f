import sys

from server.console import main

sys.exit(main())
