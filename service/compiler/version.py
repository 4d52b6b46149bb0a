"""The compiler's version: stamped into checkpoints, quantized checkpoints and engines, and part of
every stage key (``service.compiler.__version__`` re-exports it). A module of its own so that the
package's modules read it without importing the package they belong to."""

__version__ = "0.1.0"
