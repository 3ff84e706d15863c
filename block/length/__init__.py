"""Response-length estimation: data, the text encoder, estimators, evaluation and serving."""
