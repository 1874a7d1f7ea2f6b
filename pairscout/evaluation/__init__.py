"""Does the ranking hold? Short alignment probes on the pairs of a rank run, and how well each measure predicted them.

- :mod:`.probe` - :func:`~pairscout.evaluation.probe.probe`: chooses the pairs (every pair, or as many as a budget
  allows), trains them, chooses the read-out that separates them, revisits the verdict, writes the result.
- :mod:`.fused` - the fused multi-pair trainer: every probed pair's linear heads stacked and trained in one pass.
- :mod:`.readouts` - read-outs as per-image sums (zero-shot, class-aware mAP, R@k, held-out loss and its curve) and the
  target chosen by separation (:class:`~pairscout.evaluation.readouts.TargetChoice`).
- :mod:`.predictors` - which measure or unimodal score predicts the read-out (Spearman / Kendall, Holm-corrected).
- :mod:`.regret` - the verdict's regret against the rules researchers use (freeze-align, SAIL, a random pair).
- :mod:`.result` - :class:`~pairscout.evaluation.result.ProbeSettings` and
  :class:`~pairscout.evaluation.result.ProbeResult` (torch-free: the CLI and the report read them).

Training code shared with ``pairscout align`` (heads, losses, the pair's cached embeddings) lives in
:mod:`pairscout.align`; this package depends on it, never the other way round.
"""
