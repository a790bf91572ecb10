"""The front doors over the runtime core: the ``SIMIGRAD=1`` autoload and its loop hooks."""
