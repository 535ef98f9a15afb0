"""memaudit: audit text-to-image diffusion models for training-data memorization.

The import package is ``audit``; the distribution and the command are ``memaudit``.
"""

__version__ = "0.1.0"
