"""klrl: which gradient does your KL regularizer really give you? (See README.md.)"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("klrl")
except PackageNotFoundError:  # a source checkout on sys.path, not installed
    __version__ = "0+unknown"
