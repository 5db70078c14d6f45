"""How a command group adds its commands: `command(name, handler, text)` gives the sub-parser."""

import argparse
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]
Command = Callable[[str, Handler, str], argparse.ArgumentParser]
