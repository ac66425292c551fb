"""``python -m loftq`` is the ``loftq`` command."""

from loftq.cli import app

app(prog_name="loftq")
