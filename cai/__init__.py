"""cai: Constitutional AI and RLAIF, from a written constitution to an aligned policy."""

__version__ = "0.1.0"
