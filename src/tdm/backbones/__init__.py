"""Teacher families: one adapter per family behind the `Backbone` interface; see `registry`."""
