import sys

from stylemix.cli import main

sys.exit(main())
