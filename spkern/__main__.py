import sys

from spkern.cli import run

sys.exit(run())
