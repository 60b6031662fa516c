import sys

from spkern.cli import main

sys.exit(main())
