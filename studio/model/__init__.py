"""The model side of the studio: loading, the model card, generation and the one model manager."""
