"""python -m spatialformer_kernels.bench: the `spatialformer-bench` command."""
import sys

from .cli import main

sys.exit(main())
