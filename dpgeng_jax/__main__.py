"""`python -m dpgeng_jax` is the `dpgeng` command."""
import sys

from dpgeng_jax.cli import main

sys.exit(main())
