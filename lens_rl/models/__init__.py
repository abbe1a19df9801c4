"""Models: the orig wrapper, the decoder and the encoder of a consistency lens."""

from lens_rl.models.decoder import Decoder, DecoderConfig, FwdTokensOutput, Generated
from lens_rl.models.encoder import Encoder, EncoderConfig
from lens_rl.models.orig import OrigWrapper

__all__ = [
    "Decoder",
    "DecoderConfig",
    "Encoder",
    "EncoderConfig",
    "FwdTokensOutput",
    "Generated",
    "OrigWrapper",
]
