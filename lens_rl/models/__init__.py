"""Models: the orig wrapper, the decoder and the encoder of a consistency lens."""
