"""Embeddings of a paired dataset: every model of a zoo run over the rows (:mod:`.runner`, also under
torchrun), the inputs it reads (:mod:`.inputs`), the content-addressed cache they land in (:mod:`.cache`) and its
housekeeping (:mod:`.housekeeping`). The models themselves live in :mod:`pairscout.encoders`.
"""
