"""Whole experiments: a config's upstream experiments (:mod:`.upstream`) and its rehearsal in miniature
(:mod:`.rehearse`, with the tiny stand-in models of :mod:`.standins`)."""
