import sys

from visionmamba.cli import main

sys.exit(main())
