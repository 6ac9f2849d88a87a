"""plop where fine-tuning is configured: a PEFT ``LoraConfig`` in one call (:mod:`.peft`) and an
axolotl plugin (:mod:`.axolotl`); TRL's dataset formats are read by :mod:`plop.files.trl_formats`.

Nothing is imported here: the axolotl plugin needs axolotl, the rest only what plop needs.
"""
