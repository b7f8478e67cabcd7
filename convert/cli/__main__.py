"""``python -m convert.cli`` (e.g. under torchrun) runs the command line."""

from . import main

main()
