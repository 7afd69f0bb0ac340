"""The recipe: its schema (:mod:`.settings`), the resolved :class:`~.config.RunConfig`, the
per-layer plan and the llm-compressor recipe import."""
