import sys

from deepscaler.trainer.train import main

sys.exit(main())
