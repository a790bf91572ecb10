"""Split-group statistics: sinks, ``SplitStats``, ``gradient_stats`` and the microsteps statistic. Records, never steers."""
