"""Teacher families: one adapter per family behind the `Backbone` interface; `tdm.registry` maps a config to one."""
