"""Stage 2, frames -> visual tokens: SigLIP (siglip.py) -> DTS (dts.py) -> projector and pooling (encoder.py)."""
