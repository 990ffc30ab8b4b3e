import sys

from vdifs.cli import main

sys.exit(main())
