"""dipc: a Direct Inquiry Payment Code responder for DOKU Online-to-Offline payments."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dipc-doku")  # the distribution name; the command is `dipc`
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
