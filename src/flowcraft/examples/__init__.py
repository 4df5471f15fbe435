"""Example workflows shipped with flowcraft; ``flowcraft demo`` runs them."""

from pathlib import Path

EXAMPLES_DIR = Path(__file__).parent

__all__ = ["EXAMPLES_DIR"]
