"""The E4T model parts: the encoder, the weight offsets, and their assembly."""
