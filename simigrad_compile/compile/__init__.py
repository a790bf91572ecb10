"""The compile side: the ``simigrad`` backend, its compiled regions, the ``simigrad::`` graph ops and the passes."""
