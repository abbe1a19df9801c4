"""lens_rl: consistency lenses trained supervised, then fine-tuned with RL on TRL.

A consistency lens maps a hidden activation ``A`` of a frozen LM to a short text (the
decoder) and back to ``Â`` (the encoder). See README.md for the stages and commands.
"""

__version__ = "0.1.0"
