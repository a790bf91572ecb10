"""The step core: controller, ladder, window, data, optimizer wrapper, history; ``AdaptiveBatching`` ties them."""
