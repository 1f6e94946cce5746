"""`python -m dpgeng_jax` is the `dpgeng` command."""
import sys

from dpgeng_jax.cli import entry_point

sys.exit(entry_point())
