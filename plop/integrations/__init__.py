"""plop where fine-tuning is configured: TRL's dataset formats (:mod:`.datasets`), a PEFT
``LoraConfig`` in one call (:mod:`.peft`) and an axolotl plugin (:mod:`.axolotl`).

Nothing is imported here: the axolotl plugin needs axolotl, the rest only what plop needs.
"""
