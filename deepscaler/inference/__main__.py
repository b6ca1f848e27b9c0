import sys

from deepscaler.inference.server import main

sys.exit(main())
