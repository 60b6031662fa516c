import sys

from spkern.experiments.cli import run

sys.exit(run())
