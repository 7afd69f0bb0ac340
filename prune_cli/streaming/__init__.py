"""The block driver (:mod:`.driver`, the one loop over decoder blocks) and model loading
(:mod:`.loader`), which opens a model as a streamed weight source and builds the driver."""
